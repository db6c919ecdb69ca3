"""A site's own record of every computation asked of it, hash-chained (issue 24).

One JSON line per request, appended beside the site's ledger (``<ledger>.log.jsonl``) under the
ledger's lock: when, which run and round, what was asked (train, evaluate, audit), the config's
digest, the digests of the model received and of the update sent, the steps, the epsilon before
and after, the decision and its reason. Each line carries ``prev``, the hash of the line before
it, and ``hash``, SHA-256 of ``prev`` and the line's own content; ``<log>.head`` holds the last
hash and the line count. :func:`verify` recomputes the chain: an edited line breaks its own
hash, a removed or reordered one breaks the next line's ``prev``, and removed last lines no
longer match the head.

Tamper-evident, not tamper-proof: the hashes are unkeyed, so whoever can write the files can
forge a consistent log, for example by cutting lines from the end and rewriting the head from
the last line kept (found by review). Only a head written down elsewhere (a ticket, a second
machine; ``fedgen site log --verify`` prints it) pins the log up to that point.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from client.privacy_state import Ledger
from common.atomic import write_bytes

GENESIS = "0" * 64
TAIL_BYTES = 1 << 16  # a log line is under 2 KB (its reason is cut at 500 characters)
log = logging.getLogger(__name__)


def record_request(ledger_path: str, record: dict) -> None:
    """One line in the site's log beside ``ledger_path`` ('' = no ledger, no log). A log that
    cannot be written is reported and does not fail the request: the ledger, written before the
    reply, is what the spend rests on; the reply already paid for is not lost over its log line."""
    if not ledger_path:
        return
    try:
        SiteLog(ledger_path).append(record)
    except Exception:  # noqa: BLE001 - the log records the computation; it is not its condition
        log.exception("site log beside %s: this request's line could not be written", ledger_path)


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
        """Append one line (``time`` added), chained to the file's last line; returns it as written.
        The head is written after the line: a crash between the two leaves the head one line
        behind, which :meth:`verify` recognises as such (not as tampering)."""
        with self._ledger.locked():
            prev, count = self._last()
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

    def _last(self) -> tuple[str, int]:
        """The hash the next line chains to (the last line's, or the raw line's digest when it is
        unreadable: the break stays visible to :meth:`verify`) and the number of lines. Reads the
        file's tail only, and counts the lines from the head when the head is that last line's
        (every append but the first after damage): a site appends once a round, for ever."""
        size = self.path.stat().st_size if self.path.exists() else 0
        if not size:
            return GENESIS, 0
        with self.path.open("rb") as fh:
            fh.seek(max(0, size - TAIL_BYTES))
            tail = [x for x in fh.read().splitlines() if x.strip()]
        if not tail:
            return GENESIS, 0
        try:
            last = str(json.loads(tail[-1])["hash"])
        except (ValueError, KeyError, TypeError):
            last = hashlib.sha256(tail[-1]).hexdigest()
        head = self._head()
        if head is not None and head[0] == last:
            return last, head[1]
        return last, sum(1 for x in self.path.read_bytes().splitlines() if x.strip())

    def _head(self) -> tuple[str, int] | None:
        try:
            head = json.loads(self.head_path.read_text())
            return str(head["hash"]), int(head["lines"])
        except FileNotFoundError:
            return GENESIS, 0
        except (ValueError, KeyError, TypeError):
            return None

    def lines(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for x in self.path.read_text().splitlines():
            if x.strip():
                try:
                    out.append(json.loads(x))
                except ValueError:
                    out.append({"decision": "?", "reason": "an unreadable line (see `fedgen site log --verify`)"})
        return out

    def verify(self) -> Verdict:
        """Recompute the chain (under the ledger's lock, so no append is half done); the first line
        that breaks it, and why."""
        with self._ledger.locked():
            raw = [x for x in (self.path.read_text().splitlines() if self.path.exists() else []) if x.strip()]
            head = self._head()
        prev, hashes = GENESIS, []
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
            hashes.append(stored)
        if head is None:
            return Verdict(False, len(raw), None, f"the head {self.head_path} is unreadable (edited or damaged)", prev)
        hash_, count = head
        if (hash_, count) == (prev, len(raw)):
            return Verdict(True, len(raw), None, "", prev)
        if count == len(raw) - 1 and (hashes[count - 1] if count else GENESIS) == hash_:
            # An append that wrote its line but not its head (a crash between the two): intact.
            return Verdict(True, len(raw), None, "the head lags the last line (an append was interrupted)", prev)
        if count > len(raw):
            return Verdict(False, len(raw), len(raw) + 1, f"the log ends at line {len(raw)} but its head records "
                           f"{count} lines: lines were removed from its end (or the head was edited)", prev)
        return Verdict(False, len(raw), None, f"the head ({count} lines) does not match the log ({len(raw)} lines): "
                       "the head or the log was edited", prev)
