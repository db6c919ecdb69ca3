"""How one value is stored in a run database and read back (private to ``server.store*``).

A ``to_db``-style codec takes ``(value, what)`` and raises :class:`StoreError` naming
``what`` when the value cannot be stored: numbers (numpy / torch scalars included), text,
JSON lists and objects, Flower node ids. Its ``from_db`` partner turns the stored value back.

Flower node ids are unsigned 64-bit integers; SQLite integers are signed, so node ids
are stored with the same uint64 -> int64 mapping Flower's own state uses and mapped back
when read.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["StoreError"]

_U64 = 1 << 64
_I64 = 1 << 63


class StoreError(RuntimeError):
    """A run-store problem worth showing to the operator as-is (names the path)."""


def _json_default(obj: Any) -> Any:
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    tolist = getattr(obj, "tolist", None)  # small numpy arrays
    if callable(tolist):
        return tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _dumps(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, default=_json_default, sort_keys=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"cannot store {what}: {exc}") from exc


def _loads(text: str | None, default: Any) -> Any:
    if text is None:
        return default
    return json.loads(text)


def _scalar(value: Any) -> Any:
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (int, float, str)):
        return item()
    return value


def _float(value: Any, what: str) -> float | None:
    if value is None:
        return None
    value = _scalar(value)
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"cannot store {what}={value!r}: not a number") from exc


def _int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    value = _scalar(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise StoreError(f"cannot store {what}={value!r}: not an integer")
    return value


def _node_to_db(node_id: Any, what: str) -> int:
    value = _int(node_id, what)
    if value is None or not 0 <= value < _U64:
        raise StoreError(f"cannot store {what}={node_id!r}: Flower node ids are unsigned 64-bit integers")
    return value - _U64 if value >= _I64 else value


def _node_from_db(value: int) -> int:
    return value + _U64 if value < 0 else value


def _text(value: Any, what: str) -> str | None:
    return None if value is None else str(value)


def _str(value: Any, what: str) -> str:
    return str(value)


def _json_object(value: Any, what: str) -> str:
    return _dumps(dict(value or {}), what)


def _json_object_from_db(text: str | None) -> dict:
    return _loads(text, {})


def _json_list(value: Any, what: str) -> str:
    return _dumps(list(value or []), what)


def _json_list_from_db(text: str | None) -> list:
    return _loads(text, [])


def _as_stored(value: Any) -> Any:
    return value
