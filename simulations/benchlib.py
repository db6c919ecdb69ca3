"""What the federation benchmarks share: memory sampling, an in-process grid, run records.

* :class:`MemorySampler` samples, every ``interval`` seconds, the memory of a set of
  processes (a process tree, or everything a launch started, found by its private
  ``FLWR_HOME``): summed RSS (counts shared pages once per process, so it over-counts) and
  summed PSS (shared pages split between their users: what the processes cost together),
  and keeps the per-process picture at the peak so a report can say where memory went.
* :class:`LocalGrid` is a Flower ``Grid`` that runs the ClientApp in this process: the
  same server loop (``server.rounds.run_rounds``), strategy, validation and ClientApp code
  as a ``flwr run``, without SuperLink, serialization or Ray. It is the "plain loop"
  baseline of the overhead benchmark and the fast path of the tests.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Iterable
from pathlib import Path

from simulations.launch import ROOT
from simulations.procs import processes_with_env, tree_pids, trees
from simulations.runs import read_rounds, run_records

MACHINE = f"{os.cpu_count()}-core CPU"


def load_note(loads: Iterable[float]) -> str:
    """The machine's 1-minute load average at the end of the runs (other jobs share the cores)."""
    loads = list(loads)
    return f"load avg {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores" if loads else ""


def load_run_config(preset: str | None, overrides: dict | None = None) -> dict:
    """The pyproject run config, a preset on top, then overrides: the flat form Flower passes."""
    raw = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    if preset:
        raw.update(tomllib.loads((ROOT / "simulations" / f"{preset}.toml").read_text()))
    raw.update(overrides or {})
    return raw


def thread_env(threads: int) -> dict[str, str]:
    """Environment that caps every process's intra-op threads (torch reads OMP_NUM_THREADS at import).

    On a shared 2-core machine, several processes each running 2 OpenMP threads slow each
    other down far more than their share (spinning workers); one thread per process keeps
    both sides of a comparison in the same regime.
    """
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads > 0 else {}


def parse_sets(items: Iterable[str]) -> dict:
    """``key=value`` strings (TOML values, bare words as strings) -> dict."""
    from simulations.launch import _parse_override

    return dict(_parse_override(i) for i in items)


def as_sets(overrides: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


# ---------------------------------------------------------------- memory

def _mem_of(pid: int) -> tuple[int, int, str] | None:
    """(rss bytes, pss bytes, short name) of one process, or None if it is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    rss = pss = 0
    for line in rollup.splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
    return rss, pss, process_label(cmd)


def process_label(cmd: list[bytes]) -> str:
    """A short, stable name for a process of a Flower simulation (for the memory breakdown)."""
    parts = [c.decode(errors="replace") for c in cmd if c]
    text = " ".join(parts)
    for needle, label in (("ClientAppActor", "ray: ClientAppActor"), ("raylet", "ray: raylet"),
                          ("gcs_server", "ray: gcs_server"), ("dashboard", "ray: dashboard"),
                          ("log_monitor", "ray: log_monitor"), ("monitor.py", "ray: monitor"),
                          ("runtime_env", "ray: runtime_env agent"), ("default_worker", "ray: worker"),
                          ("flower-superlink", "flower-superlink"), ("flower-superexec", "flower-superexec"),
                          ("flwr-simulation", "flwr-simulation (ServerApp + Ray driver)"),
                          ("flwr run", "flwr run (CLI)"), ("flwr ls", "flwr ls (CLI)")):
        if needle in text:
            return label
    name = Path(parts[0]).name if parts else "?"
    return f"{name} {' '.join(parts[1:3])}"[:60]


class MemorySampler:
    """Peak memory of a changing set of processes, sampled on a thread.

    ``pids()`` is called every ``interval`` seconds and returns the processes to count.
    """

    def __init__(self, pids, interval: float = 0.5) -> None:
        self._pids, self.interval = pids, interval
        self.peak_rss = self.peak_pss = 0
        self.at_peak: dict[str, list[int]] = {}  # label -> [rss, pss, count] when PSS peaked
        self.max_by_label: dict[str, int] = {}  # label -> largest PSS any one such process had
        self.samples = 0
        self.timeline: list[tuple[float, int]] = []  # (time.time(), summed PSS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        rss = pss = 0
        labels: dict[str, list[int]] = {}
        for pid in self._pids():
            got = _mem_of(pid)
            if got is None:
                continue
            r, p, label = got
            rss, pss = rss + r, pss + p
            row = labels.setdefault(label, [0, 0, 0])
            row[0], row[1], row[2] = row[0] + r, row[1] + p, row[2] + 1
            self.max_by_label[label] = max(self.max_by_label.get(label, 0), p)
        self.samples += 1
        self.timeline.append((time.time(), pss))
        self.peak_rss = max(self.peak_rss, rss)
        if pss >= self.peak_pss:
            self.peak_pss, self.at_peak = pss, labels

    def breakdown(self) -> list[tuple[str, float, float, int]]:
        """(label, PSS GiB, RSS GiB, processes) at the PSS peak, largest first."""
        rows = [(k, v[1] / 2**30, v[0] / 2**30, v[2]) for k, v in self.at_peak.items()]
        return sorted(rows, key=lambda r: -r[1])


def flower_pids(flwr_home: Path):
    """Every process a launch started: those showing its private FLWR_HOME and every process below
    one (some Ray agents overwrite their environment with their title: launch.kill_started_under)."""
    return lambda: trees(processes_with_env("FLWR_HOME", str(flwr_home)))


# ---------------------------------------------------------------- runs

def site_sums(recs: list[dict], key: str) -> list[float]:
    """Per round 1..R, the sum over the sites' replies of metric ``key`` (site-seconds, ...)."""
    return [sum(float((row.get("metrics") or {}).get(key, 0.0)) for row in r["sites"])
            for r in recs if r["round"] >= 1]


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def failed_rounds_summary(runs_dir: Path) -> str:
    """The recorded rounds of a failed run with each site's status and reason, for its error message."""
    try:
        _, recs = run_records(runs_dir, newest=True)
    except (OSError, ValueError) as err:
        return f"unreadable ({err})"
    if not recs:
        return "none recorded"
    return "; ".join(f"round {r['round']}: " + (", ".join(f"{s.get('status')} {s.get('reason') or ''}".strip()
                                                        for s in r.get("sites", [])) or "no site replies")
                     for r in recs)


def run_flower(preset: str | None, overrides: dict, num_sites: int, work: Path, interval: float = 0.5,
               quiet: bool = True, env: dict[str, str] | None = None) -> dict:
    """One ``flwr run`` simulation through the launcher, timed, with the memory of all it started.

    Returns the launch time (``t0``), the round records, the launcher's phase times and the
    memory sampler.
    """
    from simulations.launch import launch

    runs_dir, flwr_home = work / "runs", work / "flwr-home"
    runs_dir.mkdir(parents=True, exist_ok=True)
    flwr_home.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    t0 = time.time()
    with MemorySampler(flower_pids(flwr_home), interval) as mem:
        code = launch(preset, as_sets(overrides), num_sites, runs_dir, quiet=quiet, flwr_home=flwr_home,
                      phases=phases, extra_env=env)
    t_end = time.time()
    if code != 0:
        raise RuntimeError(f"the flwr run failed (see {flwr_home / 'superlink.log'}; the launcher printed the end "
                           f"of its logs above); its rounds: {failed_rounds_summary(runs_dir)}")
    run_dir, recs = run_records(runs_dir)
    return {"t0": t0, "t_end": t_end, "records": recs, "run_dir": run_dir, "phases": phases, "mem": mem,
            "load": os.getloadavg()[0]}


PLAIN_APP = ROOT / "simulations" / "plainapp"


def run_plain(num_sites: int, rounds: int, work: Path, poll_interval: float, interval: float = 0.5,
              env: dict[str, str] | None = None) -> dict:
    """The same launch with Flower's floor: ``simulations/plainapp`` imports only flwr and its
    sites answer at once. Returns what :func:`run_flower` does (round 0 = sites registered)."""
    from simulations.launch import launch

    work.mkdir(parents=True, exist_ok=True)
    flwr_home, records = work / "flwr-home", work / "plain-rounds.jsonl"
    flwr_home.mkdir(exist_ok=True)
    config = {"run.num-rounds": rounds, "run.num-sites": num_sites, "run.records": str(records),
              "run.reply-poll-interval": poll_interval}
    phases: dict[str, float] = {}
    t0 = time.time()
    with MemorySampler(flower_pids(flwr_home), interval) as mem:
        code = launch(None, [], num_sites, work / "runs", quiet=True, flwr_home=flwr_home, phases=phases,
                      extra_env=env, app_dir=PLAIN_APP, run_config=config)
    t_end = time.time()
    if code != 0 or not records.exists():
        raise RuntimeError(f"the plain Flower app failed (see {flwr_home / 'superlink.log'})")
    recs = read_rounds(records)
    return {"t0": t0, "t_end": t_end, "records": recs, "phases": phases, "mem": mem, "load": os.getloadavg()[0]}


# ---------------------------------------------------------------- in-process grid

class LocalGrid:
    """A Flower Grid whose nodes run the ClientApp in this process, one message at a time.

    Each node keeps its own Context (node config with partition-id / num-partitions, as the
    simulation gives it, and its state), so a site's round is exactly what it is under
    ``flwr run``; only the transport is missing.
    """

    def __init__(self, run_config: dict, num_nodes: int, run_id: int = 1) -> None:
        from flwr.app import Context, RecordDict

        from flwr.supercore.task_identity import TaskIdentity

        from client.app import app as client_app

        # Flower stamps messages with the identity of the task creating them (set by its runtime).
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1
        self.client_app = client_app
        self.run_id = run_id
        self.node_ids = list(range(1, num_nodes + 1))
        self.contexts = {
            n: Context(run_id=run_id, node_id=n, node_config={"partition-id": n - 1, "num-partitions": num_nodes},
                       state=RecordDict(), run_config=dict(run_config))
            for n in self.node_ids
        }
        self._replies: dict[str, object] = {}

    # The parts of flwr.serverapp.Grid that fedgen's round loop and Flower's strategies use.
    def get_node_ids(self):  # noqa: ANN201
        return list(self.node_ids)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        from flwr.app import Message

        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        from flwr.app import Error, Message

        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            node = int(msg.metadata.dst_node_id)
            try:
                reply = self.client_app(msg, self.contexts[node])
            except Exception as err:  # as under Flower: the error travels back as the reply
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]


def run_local(run_config: dict, num_nodes: int, run_dir: Path) -> list[dict]:
    """Run a whole job with :class:`LocalGrid` (same server loop as ServerApp); returns the round records."""
    import random

    import torch

    from common.config import parse_run_config
    from server.evaluation import Evaluator
    from server.round_records import RoundRecorder
    from server.rounds import run_rounds
    from server.strategy import build_strategy

    run_dir.mkdir(parents=True, exist_ok=True)
    if not run_config.get("privacy.ledger-dir"):  # as the launcher gives a simulation: a ledger folder per run
        run_config = {**run_config, "privacy.ledger-dir": str(run_dir / ".site-ledgers")}
    cfg = parse_run_config(run_config)
    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    outcome = run_rounds(LocalGrid(run_config, num_nodes), cfg, build_strategy(cfg), Evaluator(cfg),
                         RoundRecorder(run_dir, None, cfg.run.num_rounds), run_dir)
    if outcome.status != "completed":
        raise RuntimeError(f"local run {outcome.status}: {outcome.reason}")
    return read_rounds(run_dir / "rounds.jsonl")


def run_local_subprocess(preset: str | None, overrides: dict, num_nodes: int, work: Path,
                         interval: float = 0.5, env: dict[str, str] | None = None) -> dict:
    """:func:`run_local` in a fresh Python process (own imports, own memory), with its memory sampled."""
    work.mkdir(parents=True, exist_ok=True)
    spec = work / "local-job.json"
    spec.write_text(json.dumps({"preset": preset, "overrides": overrides, "num_nodes": num_nodes,
                                "run_dir": str(work / "run")}))
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "simulations.benchlib", str(spec)], cwd=ROOT,
                            env={**os.environ, **(env or {})})
    try:
        with MemorySampler(lambda: tree_pids(proc.pid), interval) as mem:
            code = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: do not leave the job running
            proc.kill()
            proc.wait()
    if code != 0:
        raise RuntimeError(f"the in-process run failed (exit {code})")
    recs = read_rounds(work / "run" / "rounds.jsonl")
    return {"t0": t0, "t_end": time.time(), "records": recs, "mem": mem, "load": os.getloadavg()[0]}


def save_png(fig, path: Path) -> Path:
    """Save a matplotlib figure small (docs PNGs stay well under 200 KB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    return path


def _local_job_main(spec_path: str) -> None:
    import logging

    from common.logs import setup_logging

    setup_logging()
    logging.getLogger().setLevel(logging.WARNING)
    spec = json.loads(Path(spec_path).read_text())
    run_config = load_run_config(spec["preset"], spec["overrides"])
    run_local(run_config, spec["num_nodes"], Path(spec["run_dir"]))


if __name__ == "__main__":
    _local_job_main(sys.argv[1])
