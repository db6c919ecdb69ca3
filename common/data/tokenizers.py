"""Tokenizers of the language model: characters (a fixed vocabulary plus ``<unk>``) or UTF-8 bytes.

Both are fully determined by ``lm.tokenizer`` in the run config (:func:`make_tokenizer`), so
every site and the server build the same one; ``to_config``/``from_config`` (and
:func:`tokenizer_from_config`) turn one into a plain dict and back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from common.data.text import TextDataError

UNK_ID = 0


class CharTokenizer:
    """Character vocabulary; id 0 is ``<unk>`` (decoded as U+FFFD), ``chars`` get ids 1.."""

    kind: Literal["char"] = "char"
    UNK_TEXT = "\ufffd"

    def __init__(self, chars: str) -> None:
        if not chars:
            raise TextDataError("a CharTokenizer needs at least one character in its vocabulary")
        dupes = sorted({c for c in chars if chars.count(c) > 1})
        if dupes:
            raise TextDataError(f"CharTokenizer vocabulary repeats {dupes!r}; list each character once")
        self.chars = chars
        self._ids = {c: i for i, c in enumerate(chars, start=1)}
        self.vocab_size = len(chars) + 1

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Vocabulary = the distinct characters of ``text``, sorted by code point."""
        return cls("".join(sorted(set(text))))

    @classmethod
    def default(cls) -> CharTokenizer:
        """Fixed vocabulary shared by every site and the server: ``"\\n"`` + printable ASCII (32..126)."""
        return cls("\n" + "".join(chr(i) for i in range(32, 127)))

    def encode(self, s: str) -> list[int]:
        return [self._ids.get(c, UNK_ID) for c in s]

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in _as_int_list(ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside the vocabulary 0..{self.vocab_size - 1}")
            out.append(self.chars[i - 1] if i else self.UNK_TEXT)
        return "".join(out)

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars}

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> CharTokenizer:
        if d.get("kind") != cls.kind or not isinstance(d.get("chars"), str):
            raise TextDataError(
                f"not a char tokenizer config: {d!r}; expected {{'kind': 'char', 'chars': '<vocabulary>'}}"
            )
        return cls(d["chars"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash((self.kind, self.chars))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256): nothing is unknown; invalid sequences decode as U+FFFD."""

    kind: Literal["byte"] = "byte"
    vocab_size = 256

    def encode(self, s: str) -> list[int]:
        return list(s.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        values = _as_int_list(ids)
        bad = [i for i in values if not 0 <= i < 256]
        if bad:
            raise ValueError(f"byte token ids must be 0..255, got {bad[:5]}")
        return bytes(values).decode("utf-8", errors="replace")

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> ByteTokenizer:
        if d.get("kind") != cls.kind:
            raise TextDataError(f"not a byte tokenizer config: {d!r}; expected {{'kind': 'byte'}}")
        return cls()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(self.kind)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


Tokenizer = CharTokenizer | ByteTokenizer


def _as_int_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        return [int(i) for i in ids.reshape(-1).tolist()]
    return [int(i) for i in ids]


def make_tokenizer(kind: Literal["char", "byte"]) -> Tokenizer:
    """``"char"``: :meth:`CharTokenizer.default` (fixed ASCII vocab); ``"byte"``: :class:`ByteTokenizer`."""
    if kind == "char":
        return CharTokenizer.default()
    if kind == "byte":
        return ByteTokenizer()
    raise TextDataError(f"unknown tokenizer {kind!r}; use 'char' or 'byte'")


def tokenizer_from_config(d: dict[str, Any]) -> Tokenizer:
    """Rebuild whichever tokenizer ``to_config()`` produced ``d``."""
    kinds: dict[str, type[Tokenizer]] = {"char": CharTokenizer, "byte": ByteTokenizer}
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind not in kinds:
        raise TextDataError(f"tokenizer config {d!r} has no known 'kind'; expected 'char' or 'byte'")
    return kinds[kind].from_config(d)
