"""A site's privacy state, in one place: the plan, the price, the charge and the ledger.

Everything a site spends privacy on goes through :class:`SitePrivacy`: a training round
(``client/site.py``) and a sample-level audit (``client/audit.py``) alike.

1. **Plan** (:func:`make_plan`): noise multiplier, Poisson sample rate, steps and delta of
   one DP-SGD run, from the site's record count and the config. One sample-rate formula
   (``common.privacy.steps_per_round``: ``q = 1 / ceil(N / B)``, what Opacus' Poisson loader uses).
2. **Price** (:meth:`SitePrivacy.reserve`): the epsilon the site has spent on these records
   and the epsilon it would reach after this release, both composed by Opacus' accountant
   over the whole recorded history. Past the site's budget the release is refused
   (:class:`BudgetExceeded`) before any private data is touched.
3. **Charge ahead** (write-ahead): the planned steps are recorded as a *pending* line, and
   in the history, before training starts. A crash mid-round leaves the charge on record:
   the ledger over-counts, never under-counts.
4. **Confirm** (:meth:`SitePrivacy.confirm`): after training the pending charge is replaced
   by what the accountant really charged (the same steps unless training stopped early).

The ledger file is read, priced and written under an exclusive ``fcntl.flock`` on a lock
file beside it, so two trainings on one ledger (two runs on one SuperNode, or ``fedgen
audit sample`` during a run) each see the other's charge: the ledger records the sum.
Without a ledger file the state lives in ``Context.state`` (this process's memory, lost
on a restart); DP training then needs the node config's loudly named override
``unsafe-memory-ledger = true``. Simulations always have a per-run ledger folder
(``privacy.ledger-dir``, set by ``simulations/launch.py``).

The ledger file keeps each entry's pending lines and its newest :data:`ROUND_LINES_KEPT`
confirmed ones; older confirmed lines move to an append-only archive beside it
(``<ledger>.rounds.jsonl``, :meth:`Ledger.archived`), so that what every round reads, prices
and writes stays the same size however many rounds the site has served (a warm worker's memory
and its round's CPU grew with the file: docs/RESULTS.md, "What grew after that was the privacy
ledger"). The history, from which every epsilon is computed, stays whole in the file; a line
is appended to the archive (and fsync'd) before the file that drops it is written, so an
interrupted write leaves a line in both places, never in neither (:meth:`Ledger.archived`
reads each line once).

The ledger key is the dataset's name and a SHA-256 digest of the records the site trains
on (the loaded tensors), so moving a data folder keeps its spend. Ledgers written by
fedgen before the digest key (version 1, keyed by name and folder path) are carried over
on first use.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ConfigRecord, RecordDict

from client.policy import PolicyRefusal, SitePolicy, check_plan
from common import privacy
from common.atomic import write_bytes
from common.config import AppConfig, SiteConfig, site_budget
from common.privacy import DPPlan, HistoryEntry

log = logging.getLogger(__name__)

LEDGER_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # version 1: no pending lines, keys of name + folder path
STATE_KEY = "fedgen-privacy"  # Context.state record of a site without a ledger file
# Confirmed round lines an entry keeps in the ledger file; older ones go to the archive. Kept
# whatever their age: every pending line (a crashed round's charge, taken over by its request) and
# the newest confirmed line that names a request (the update saved beside the ledger is that
# round's: a request asked again is answered with it only if its line is in the file; audits and
# rounds without a run name add lines that name none).
ROUND_LINES_KEPT = 10


class LedgerError(RuntimeError):
    """The ledger cannot be trusted (or there is none where one is required); the site refuses to train."""


class BudgetExceeded(RuntimeError):
    """The release would take the site past its budget; nothing was trained or spent."""

    def __init__(self, what: str, spent: float, would: float, budget: float, delta: float) -> None:
        self.spent, self.would, self.budget = spent, would, budget
        super().__init__(f"budget-exhausted: {what} would raise epsilon from {spent:.4f} to {would:.4f}, "
                         f"above the site's budget {budget:g} (delta {delta:g}); nothing was trained or spent")


@dataclass
class LedgerEntry:
    """What a site has spent on one set of records: the accountant history and one line per release."""

    history: list[HistoryEntry] = field(default_factory=list)
    delta: float = 0.0
    epsilon: float = 0.0
    budget: float = 0.0
    accountant: str = "rdp"
    rounds: list[dict] = field(default_factory=list)  # run, family, round, steps, noise, sample_rate, state...

    def to_json(self) -> dict:
        return {**self.__dict__, "history": [list(h) for h in self.history]}

    @classmethod
    def from_json(cls, raw: dict) -> LedgerEntry:
        return cls(**{**raw, "history": [(float(n), float(q), int(s)) for n, q, s in raw["history"]]})

    def accountant_state(self) -> dict:
        """Opacus' accountant ``state_dict`` of this history (``load_state_dict`` restores it)."""
        return {"history": list(self.history), "mechanism": self.accountant}


# --- the plan -----------------------------------------------------------------------------



@functools.lru_cache(maxsize=64)
def _calibrated_noise(target: float, delta: float, q: float, steps: int, accountant: str) -> float:
    return privacy.calibrate_noise(target, delta, sample_rate=q, total_steps=steps, accountant=accountant)  # slow: many accountant calls


def make_plan(cfg: AppConfig, num_records: int, total_steps: int | None = None,
              delta_records: int | None = None) -> DPPlan:
    """The DP-SGD plan of a site with ``num_records`` records.

    ``total_steps``: the steps the noise is calibrated for (default: every round of the run,
    so that the site reaches ``privacy.target-epsilon`` at the last one). ``delta_records``:
    the record count the automatic delta is taken from (the audit keeps the site's own).
    """
    p = cfg.privacy
    q, steps = privacy.steps_per_round(num_records, cfg.train.batch_size, cfg.train.local_epochs, cfg.train.max_steps)
    delta = p.delta or privacy.auto_delta(delta_records or num_records)
    privacy.check_delta(delta, num_records)
    total = total_steps if total_steps is not None else steps * cfg.run.num_rounds
    noise = p.noise_multiplier or _calibrated_noise(p.target_epsilon, delta, q, total, p.accountant)
    return DPPlan(noise, q, steps, delta, p.accountant, p.max_grad_norm)


# --- the key: which records the spend is on -----------------------------------------------


def records_digest(data: torch.utils.data.Dataset) -> str:
    """SHA-256 of the records a site trains on (the loaded tensors, in order).

    TensorDataset (images and labels) and token windows (the encoded text) are hashed
    whole, tens of milliseconds for a site's partition; any other dataset item by item.
    """
    h = hashlib.sha256()
    tensors = getattr(data, "tensors", None)
    if tensors is None and isinstance(getattr(data, "tokens", None), torch.Tensor):
        tensors = (data.tokens, torch.tensor([data.context, data.stride]))
    if tensors is None:
        tensors = [t for i in range(len(data)) for t in data[i] if isinstance(t, torch.Tensor)]
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def dataset_key(cfg: AppConfig, data: torch.utils.data.Dataset) -> str:
    """Identity of the records a site spends privacy on: the dataset's name and their digest.

    Independent of where the files are and of the model. The same records loaded
    differently (another ``data.image-size``, tokenizer or context length) are other
    tensors, hence another key: keep those settings fixed for a site's data.
    """
    return f"{cfg.data.dataset}|sha256:{records_digest(data)}"


def legacy_dataset_key(cfg: AppConfig, site: SiteConfig) -> str:
    """The key fedgen used before the digest (ledger version 1): name and folder path."""
    d = cfg.data
    if site.data_path:
        return f"{d.dataset}|{site.data_path}"
    key = (f"{d.dataset}|{d.path or 'default'}|{d.partitioner}|alpha={d.dirichlet_alpha}|seed={cfg.run.seed}"
           f"|partition={site.partition_id}/{d.num_partitions or site.num_partitions}")
    if d.dataset == "shakespeare":
        key += f"|heldout={d.heldout_plays}|min-chars={d.min_chars}"
    return key


# --- the ledger file ----------------------------------------------------------------------


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on ``path`` (created if missing; never deleted, so every process locks one file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _checksum(entries: dict) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


class Ledger:
    """A JSON file of ledger entries keyed by dataset identity, with a checksum and a lock file beside it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock (``fcntl.flock``) for one read-price-write; other processes wait for it."""
        with _flock(self.lock_path):
            yield

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Held for a whole training round on this ledger: rounds on one ledger run one at a time.

        A second process asked the same request waits, then replays the saved update. The
        kernel drops the lock when its process dies, so a round whose process crashed
        mid-training can be taken over (:meth:`SitePrivacy.adopt`)."""
        with _flock(self.path.with_name(self.path.name + ".training.lock")):
            yield

    def read(self) -> dict:
        if not self.path.exists():
            return {}
        try:
            doc = json.loads(self.path.read_text())
            entries = doc["entries"]
            ok = doc.get("version") in _READABLE_VERSIONS and doc.get("checksum") == _checksum(entries)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LedgerError(
                f"privacy ledger {self.path} is unreadable ({err}); the site will not train until it is "
                "restored from a backup or an operator decides what was spent"
            ) from None
        if not ok:
            raise LedgerError(
                f"privacy ledger {self.path} fails its checksum or version check (edited or corrupt); "
                "the site will not train until it is restored from a backup"
            )
        return entries

    def load(self, key: str) -> LedgerEntry:
        raw = self.read().get(key)
        return LedgerEntry() if raw is None else LedgerEntry.from_json(raw)

    def write(self, entries: dict) -> None:
        doc = {"version": LEDGER_VERSION, "updated_at": time.time(), "entries": entries,
               "checksum": _checksum(entries)}
        write_bytes(self.path, json.dumps(doc, indent=1).encode())

    @property
    def archive_path(self) -> Path:
        return self.path.with_name(self.path.name + ".rounds.jsonl")

    def archive(self, key: str, lines: list[dict]) -> None:
        """Append ``key``'s confirmed round ``lines`` to the archive, on disk before the ledger drops them."""
        if not lines:
            return
        data = "".join(json.dumps({"key": key, **line}, sort_keys=True) + "\n" for line in lines).encode()
        with open(self.archive_path, "ab+") as fh:
            if fh.seek(0, os.SEEK_END):  # after a torn append (the machine died in one), start a new line
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    data = b"\n" + data
            fh.write(data)  # append mode: at the end whatever was read
            fh.flush()
            os.fsync(fh.fileno())

    def archived(self, key: str) -> list[dict]:
        """``key``'s round lines moved out of the ledger file, oldest first, each once (an interrupted
        write can leave a line in the archive twice, and in the file too).

        Not verified: no privacy decision reads the archive (epsilon comes from the checksummed
        history, a replay from the file's lines); it is the record of old rounds for operators,
        beside the site's hash-chained log of requests (``client/site_log.py``). A line that
        does not parse is skipped: the torn end of an append the machine died in, whose lines the
        ledger file still holds."""
        if not self.archive_path.exists():
            return []
        return _once(line for line in _parsed(self.archive_path.read_text()) if line.pop("key", None) == key)

    def all_rounds(self, key: str) -> list[dict]:
        """Every round line of ``key``: the archive's, then the file's, each once. The file is read
        first: a line leaves it only after it reached the archive, so a round archiving between
        the two reads cannot hide it (no lock: the status command must not hold up a round)."""
        recent = self.load(key).rounds
        return _once([*self.archived(key), *recent])


def _parsed(text: str) -> Iterator[dict]:
    for raw in text.splitlines():
        try:
            yield json.loads(raw)
        except ValueError:
            continue


def _once(lines) -> list[dict]:
    """``lines`` without repeats, by id (a line written before ids, only ever in the file, counts)."""
    out, seen = [], set()
    for line in lines:
        mark = line.get("id")
        if mark is None or mark not in seen:
            seen.add(mark)
            out.append(line)
    return out


def _pending_line(entry: LedgerEntry, request: str) -> dict | None:
    """The pending line that charged ``request`` ahead, if there is one."""
    return next((r for r in entry.rounds if r.get("request") == request and r.get("state") == "pending"), None)


def _confirmed(entry: LedgerEntry, line: dict, fields: dict) -> None:
    """Mark ``line`` confirmed (with ``fields``) and move it to the end: lines are kept in the order
    they were confirmed, so the newest confirmed line naming a request is the update saved last (a
    round taken over is saved and confirmed after others), the line :func:`_archivable` keeps."""
    line.update({**fields, "state": "confirmed"})
    entry.rounds.remove(line)
    entry.rounds.append(line)


def _archivable(rounds: list[dict]) -> list[dict]:
    """The confirmed lines older than the newest :data:`ROUND_LINES_KEPT` (a version-1 line, which has
    no state, is a confirmed one), but for the newest confirmed line that names a request; pending
    lines stay whatever their age."""
    confirmed = [line for line in rounds if line.get("state") != "pending"]
    saved = next((line for line in reversed(confirmed) if line.get("request")), None)
    return [line for line in confirmed[:max(len(confirmed) - ROUND_LINES_KEPT, 0)] if line is not saved]


# --- the site's state: price, charge ahead, confirm ----------------------------------------


@dataclass
class Reservation:
    """A charge recorded ahead of a release: what was priced, and the pending line naming it."""

    plan: DPPlan
    steps: int
    spent: float  # epsilon before this release
    would: float  # epsilon after it, as priced
    budget: float
    line_id: str


def _without(history: list[HistoryEntry], removed: HistoryEntry) -> list[HistoryEntry]:
    """``history`` minus ``removed``'s steps at its noise and rate (RDP and PRV composition commute)."""
    n0, q0, left = removed
    out: list[HistoryEntry] = []
    for n, q, s in reversed(history):
        if left and n == n0 and q == q0:
            take = min(s, left)
            s, left = s - take, left - take
        if s:
            out.append((n, q, s))
    if left:
        raise LedgerError(f"the ledger's history has no pending charge of {removed}; it was edited during the round")
    return privacy.compact(list(reversed(out)))


def ledger_path(cfg: AppConfig, site: SiteConfig) -> str:
    """The site's ledger file: its node config's ``ledger-path``, else one under the run's
    ``privacy.ledger-dir``, else '' (none). Its log and approvals live beside it."""
    ledger_dir = cfg.privacy.ledger_dir
    return site.ledger_path or (
        str(Path(ledger_dir) / f"partition-{site.partition_id}-of-{site.num_partitions}.json") if ledger_dir else "")


class SitePrivacy:
    """One site's spend on one set of records: the ledger file when there is one, else ``Context.state``."""

    def __init__(self, cfg: AppConfig, site: SiteConfig, key: str, state: RecordDict | None = None,
                 legacy_keys: tuple[str, ...] = (), policy: SitePolicy | None = None) -> None:
        self.cfg, self.site, self.key, self.legacy_keys, self.policy = cfg, site, key, legacy_keys, policy
        self.state = state if state is not None else RecordDict()
        path = ledger_path(cfg, site)
        self.ledger = Ledger(path) if path else None
        self.budget = site_budget(cfg, site)
        if policy is not None and policy.max_epsilon > 0:  # the site's policy caps every budget a run names
            self.budget = min(self.budget, policy.max_epsilon)

    def require_durable(self) -> None:
        """Refuse DP without a ledger file unless the operator accepted an in-memory one."""
        if self.ledger is None and not self.site.unsafe_memory_ledger:
            raise LedgerError(
                "this site has no privacy ledger file: its spend would live only in this process's memory and "
                "restart at zero with it. Set the node config's ledger-path (e.g. --node-config "
                "ledger-path=/var/lib/fedgen/ledger.json), or the run's privacy.ledger-dir; for a "
                "throwaway test only, set unsafe-memory-ledger = true"
            )

    def _from_state(self) -> LedgerEntry:
        rec = self.state.get(STATE_KEY)
        return LedgerEntry.from_json(json.loads(rec[self.key])) if rec is not None and self.key in rec else LedgerEntry()

    def _from_file(self, entries: dict) -> LedgerEntry:
        """This key's entry, or the one recorded under a legacy key (carried over when next saved)."""
        if self.key in entries:
            return LedgerEntry.from_json(entries[self.key])
        old = next((k for k in self.legacy_keys if k in entries), None)
        if old is None:
            return LedgerEntry()
        log.info("privacy ledger %s: the spend recorded under %r carries over to %r", self.ledger.path, old, self.key)
        return LedgerEntry.from_json(entries[old])

    # -- reading and writing the entry (under the ledger's lock when there is a file) --
    @contextlib.contextmanager
    def _entry(self) -> Iterator[LedgerEntry]:
        """The entry, loaded (and carried over from a legacy key); saved when the block ends without error."""
        if self.ledger is None:
            entry = self._from_state()
            yield entry
            rec = self.state.get(STATE_KEY) or ConfigRecord()
            rec[self.key] = json.dumps(entry.to_json())
            self.state[STATE_KEY] = rec
            return
        with self.ledger.locked():
            entries = self.ledger.read()
            entry = self._from_file(entries)
            yield entry
            # A line written before lines had ids gets one first, in a write of its own (an id
            # assigned and lost in a failed write could otherwise archive it twice under two ids).
            unnamed = [line for line in entry.rounds if not line.get("id")]
            for line in unnamed:
                line["id"] = uuid.uuid4().hex
            old = [] if unnamed else _archivable(entry.rounds)
            if old:  # the archive first: a crash between the two writes leaves the lines in both
                self.ledger.archive(self.key, old)
                moved = {id(line) for line in old}
                entry.rounds = [line for line in entry.rounds if id(line) not in moved]
            entries[self.key] = entry.to_json()
            self.ledger.write(entries)

    def load(self) -> LedgerEntry:
        """The entry as recorded now (read only, no lock)."""
        if self.ledger is None:
            return self._from_state()
        return self._from_file(self.ledger.read())

    def spent(self, plan: DPPlan) -> float:
        return privacy.epsilon(self.load().history, plan.delta, plan.accountant)

    # -- the charge --
    def reserve(self, plan: DPPlan, steps: int, *, line: dict, what: str = "this round",
                extra: tuple[HistoryEntry, ...] = ()) -> Reservation:
        """Price ``steps`` DP-SGD steps of ``plan`` (and ``extra`` releases, e.g. a noised
        diagnostic); past the budget raise :class:`BudgetExceeded`; else record them as a pending
        charge (history and a line) before any private data is touched. ``extra`` stays charged
        as priced; :meth:`confirm` replaces only the DP-SGD steps."""
        self.require_durable()
        charge = [(plan.noise_multiplier, plan.sample_rate, int(steps)), *extra]
        with self._entry() as entry:
            spent = privacy.epsilon(entry.history, plan.delta, plan.accountant)
            would = privacy.epsilon(privacy.compact([*entry.history, *charge]), plan.delta, plan.accountant)
            if self.policy is not None:  # the site's own rules on the plan (PolicyRefusal: nothing written)
                check_plan(self.policy, noise_multiplier=plan.noise_multiplier, delta=plan.delta, spent=spent,
                           would=would)
                if self.policy.max_epsilon > 0:
                    self._check_site_total(entry, charge, plan)
            if would > self.budget * (1 + 1e-9):
                raise BudgetExceeded(what, spent, would, self.budget, plan.delta)
            line_id = uuid.uuid4().hex
            entry.history = privacy.compact([*entry.history, *charge])
            entry.delta, entry.accountant, entry.budget = plan.delta, plan.accountant, self.budget
            entry.epsilon = would
            entry.rounds.append({**line, "steps": int(steps), "noise": plan.noise_multiplier,
                                 "sample_rate": plan.sample_rate, "state": "pending", "id": line_id,
                                 **({"extra": [list(e) for e in extra]} if extra else {})})
        return Reservation(plan, int(steps), spent, would, self.budget, line_id)

    def _check_site_total(self, entry: LedgerEntry, charge: list[HistoryEntry], plan: DPPlan) -> None:
        """The policy's ``max-epsilon`` over *every* entry of this ledger, this charge included.

        Entries are keyed by the digest of the loaded records, and the run decides how records
        are loaded (``data.image-size``, a tokenizer...): the same files loaded another way are
        another entry with its own history (a reviewer spent 4 x 3 on one site's records under a
        cap of 3 that way). So the cap composes all of the site's histories as if they were on
        the same records (a valid upper bound whatever they share), at the smaller of the plan's
        delta and the policy's ``max-delta``."""
        others = [h for key, raw in (self.ledger.read() if self.ledger is not None else {}).items()
                  if key != self.key for h in LedgerEntry.from_json(raw).history]
        delta = min(plan.delta, self.policy.max_delta)
        total = privacy.epsilon([*others, *entry.history, *charge], delta, plan.accountant)
        if total > self.policy.max_epsilon * (1 + 1e-9):
            raise PolicyRefusal("max-epsilon", round(total, 6), self.policy.max_epsilon)

    def adopt(self, plan: DPPlan, request: str) -> Reservation | None:
        """The pending charge of a round asked again, left by a process that died before sending it.

        Call it holding the ledger's training lock (:meth:`Ledger.training`): nothing else can
        be training on this ledger, and the dead process sent nothing (a sent update is saved
        first and replayed instead), so training again under the charge already on record
        releases one update for one charge.
        """
        if self.ledger is None:
            return None
        with self.ledger.locked():
            entry = self._from_file(self.ledger.read())
        line = _pending_line(entry, request)
        if line is None or (line["noise"], line["sample_rate"]) != (plan.noise_multiplier, plan.sample_rate):
            return None
        now = privacy.epsilon(entry.history, plan.delta, plan.accountant)
        log.info("privacy ledger %s: round %s was charged but never sent (its process stopped); training it again "
                 "under that charge", self.ledger.path, line.get("round"))
        return Reservation(plan, int(line["steps"]), now, now, self.budget, line["id"])

    def settle_sent(self, request: str) -> None:
        """The saved update of ``request`` is being sent again: a pending line for it (its process
        saved the update, then died before confirming) becomes confirmed at the steps charged
        ahead, which stay in the history as they are (an over-count if training had stopped
        early). :meth:`adopt` takes over pending lines only, so once an update has left, its
        request is never trained again under the same charge; asked after another round's
        update replaced the saved one, it is trained and charged anew."""
        if self.ledger is None or _pending_line(self.load(), request) is None:
            return  # the usual replay (its line confirmed): the ledger is not written
        with self._entry() as entry:
            line = _pending_line(entry, request)
            if line is not None:
                _confirmed(entry, line, {"sent-again": True})

    def confirm(self, res: Reservation, charged: list[HistoryEntry], **extra) -> float:
        """Replace the pending charge by what the accountant ``charged``; return the site's epsilon now."""
        plan = res.plan
        with self._entry() as entry:
            line = next((r for r in entry.rounds if r.get("id") == res.line_id), None)
            if line is None or line.get("state") != "pending":
                raise LedgerError(f"the pending charge {res.line_id} is no longer pending in the ledger "
                                  f"({'gone' if line is None else 'already ' + str(line.get('state'))}); it was "
                                  "edited during the round")
            history = _without(entry.history, (plan.noise_multiplier, plan.sample_rate, res.steps))
            entry.history = privacy.compact([*history, *charged])
            entry.epsilon = privacy.epsilon(entry.history, plan.delta, plan.accountant)
            _confirmed(entry, line, {"steps": int(sum(s for _, _, s in charged)), **extra})
            eps = entry.epsilon
        return eps

