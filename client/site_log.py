"""A site's own record of every computation asked of it, hash-chained (issue 24).

One JSON line per request, appended beside the site's ledger (``<ledger>.log.jsonl``) under the
ledger's lock: when, which run and round, what was asked (train, evaluate, audit), the config's
digest, the digests of the model received and of the update sent, the steps, the epsilon before
and after, the decision and its reason. Each line carries ``prev``, the hash of the line before
it, and ``hash``, SHA-256 of ``prev`` and the line's own content; ``<log>.head`` holds the last
hash and the line count. :func:`verify` recomputes the chain: an edited line breaks its own
hash, a removed or reordered one breaks the next line's ``prev``, and removed last lines no
longer match the head.

Tamper-evident, not tamper-proof: whoever can rewrite the whole file and its head can forge a
new chain. The head printed by ``fedgen site log`` can be written down elsewhere (a ticket, a
second machine) to pin the log up to that point.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from client.privacy_state import Ledger
from common.atomic import write_bytes

GENESIS = "0" * 64


def _digest(prev: str, body: dict) -> str:
    return hashlib.sha256((prev + json.dumps(body, sort_keys=True, separators=(",", ":"))).encode()).hexdigest()


def arrays_digest(arrays) -> str:
    """SHA-256 of a model's arrays (names, dtypes, shapes, bytes), or '' for none."""
    if arrays is None:
        return ""
    h = hashlib.sha256()
    for name, arr in arrays.items():
        x = arr.numpy()
        h.update(f"{name}|{x.dtype.str}|{x.shape}|".encode())
        h.update(x.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    lines: int
    broken_at: int | None  # 1-based line number where the chain breaks
    reason: str
    head: str


class SiteLog:
    def __init__(self, ledger_path: str | Path) -> None:
        ledger_path = Path(ledger_path)
        self.path = ledger_path.with_name(ledger_path.name + ".log.jsonl")
        self.head_path = self.path.with_name(self.path.name + ".head")
        self._ledger = Ledger(ledger_path)

    def append(self, record: dict) -> dict:
        """Append one line (``time`` added), chained to the last; returns the line as written."""
        with self._ledger.locked():
            prev, count = self._head()
            body = {"time": round(time.time(), 3), **record, "prev": prev}
            line = {**body, "hash": _digest(prev, body)}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (json.dumps(line, sort_keys=True) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            write_bytes(self.head_path, json.dumps({"hash": line["hash"], "lines": count + 1}).encode())
        return line

    def _head(self) -> tuple[str, int]:
        try:
            head = json.loads(self.head_path.read_text())
            return str(head["hash"]), int(head["lines"])
        except FileNotFoundError:
            return GENESIS, 0

    def lines(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]

    def verify(self) -> Verdict:
        """Recompute the chain; the first line that breaks it, and why."""
        raw = self.path.read_text().splitlines() if self.path.exists() else []
        prev = GENESIS
        for i, text in enumerate(raw, start=1):
            try:
                line = json.loads(text)
                stored = line.pop("hash")
            except (ValueError, KeyError, AttributeError):
                return Verdict(False, len(raw), i, "not a log line (unreadable JSON or no hash)", prev)
            if line.get("prev") != prev:
                return Verdict(False, len(raw), i, "does not follow the line before it: a line was removed, "
                               "inserted or reordered before it", prev)
            if _digest(prev, line) != stored:
                return Verdict(False, len(raw), i, "its content does not match its hash: the line was edited", prev)
            prev = stored
        head, count = self._head()
        if (head, count) != (prev, len(raw)):
            return Verdict(False, len(raw), len(raw) + 1 if count > len(raw) else None,
                           f"the log ends at line {len(raw)} but its head records {count} lines: lines were "
                           "removed from its end (or the head was edited)", prev)
        return Verdict(True, len(raw), None, "", prev)
