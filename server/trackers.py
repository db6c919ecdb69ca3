"""A run in the trackers ML engineers already use: TensorBoard and MLflow (issue 23).

One code path for both uses: ``fedgen export RUN --tensorboard DIR | --mlflow URI`` replays a
run's recorded rounds (finished or running), and ``run.tensorboard-dir`` / ``run.mlflow-uri``
make the server log each round as it lands (:class:`LiveTrackers`, called by the round
recorder). What a round gives a tracker (:func:`round_scalars`): its train and evaluation
metrics, the federation's and each site's epsilon and budget, the user-level epsilon, the
sampled / ok / failed / refused sites, bytes and the round's seconds, against the round number;
its sample grid as an image (its text samples as text); the resolved config as hyperparameters;
the audits when there are any.

Exports are idempotent: TensorBoard's event files of a run are written again from scratch in
``DIR/<run>`` (an export replaces the previous one, and a live log: export into another folder
than the one a running run logs to); MLflow's run is found by its ``fedgen.run-key`` tag and
only the (metric, step) points it does not hold yet are logged. An export reads the run store
(one record per round: a resumed run's retrained rounds as they were last recorded).

The trackers' own libraries do the writing: TensorBoard's through ``torch.utils.tensorboard``
(extra ``tensorboard``), MLflow's client (extra ``mlflow``, ``mlflow-skinny``); a missing one is
named with the command that installs it. MLflow's default store here is a local SQLite file
(``sqlite:///path/mlflow.db``; MLflow 3 retired the plain ``file:`` store), its artifacts in a
folder beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from server.round_records import site_tag

log = logging.getLogger(__name__)


class TrackerError(RuntimeError):
    """A tracker that cannot be used (its library missing, its store unreachable)."""


def _need(module: str, extra: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise TrackerError(f"{module} is not installed: `pip install -e '.[{extra}]'` (the {extra} extra)") from None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def round_scalars(rec: dict) -> dict[str, float]:
    """A round record's scalars, by tracker tag."""
    out: dict[str, float] = {}
    for section in ("train", "eval"):
        for key, value in (rec.get(section) or {}).items():
            if (v := _num(value)) is not None:
                out[f"{section}/{key}"] = v
    for key, tag in (("epsilon_max", "privacy/epsilon-max"), ("user_epsilon", "privacy/user-epsilon"),
                     ("bytes_sent", "comm/bytes-sent"), ("bytes_received", "comm/bytes-received")):
        if (v := _num(rec.get(key))) is not None:
            out[tag] = v
    sites = rec.get("sites") or []
    out["sites/sampled"] = float(len(rec.get("sampled") or []))
    for status in ("ok", "failed", "refused"):
        out[f"sites/{status}"] = float(sum(s.get("status") == status for s in sites))
    for row in sites:
        for key in ("epsilon", "budget"):
            if (v := _num(row.get(key))) is not None:
                out[f"privacy/site/{site_tag(row)}/{key}"] = v
    if (a := _num(rec.get("started_at"))) is not None and (b := _num(rec.get("ended_at"))) is not None:
        out["time/round-seconds"] = b - a
    return out


def nested_config(flat: dict) -> dict:
    """The run's flat config (``section.key``, as ``config.json`` and ``AppConfig.to_flat`` give it)
    by section: export and live logging name every parameter the same way."""
    nested: dict = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = value
    return nested


def flat_params(config: dict) -> dict[str, str]:
    """The resolved config as flat ``section.key`` hyperparameters (strings)."""
    out = {}
    for section, values in config.items():
        if isinstance(values, dict):
            for key, value in values.items():
                out[f"{section}.{key}"] = json.dumps(value) if not isinstance(value, str) else value
        else:
            out[section] = str(values)
    return out


class Tracker(Protocol):
    def start(self, run_name: str, params: dict[str, str], fresh: bool, resume_from: int = 0) -> None: ...
    def log_round(self, rec: dict, run_dir: Path) -> None: ...
    def log_audits(self, audits: list[dict]) -> None: ...
    def close(self, status: str = "") -> None: ...


class TensorBoardTracker:
    def __init__(self, log_dir: str | Path) -> None:
        self.root = Path(log_dir)
        self.writer = None

    def start(self, run_name: str, params: dict[str, str], fresh: bool, resume_from: int = 0) -> None:
        tb = _need("torch.utils.tensorboard", "tensorboard")
        _need("tensorboard", "tensorboard")
        run_dir = self.root / run_name
        if fresh and run_dir.exists():  # an export replaces what an earlier export or live log wrote
            for old in run_dir.glob("events.out.tfevents.*"):
                old.unlink()
        # A resumed run trains its rounds from resume_from again: TensorBoard drops what the
        # earlier process logged from that step on (purge_step), so no step shows twice.
        self.writer = tb.SummaryWriter(log_dir=str(run_dir), purge_step=resume_from or None)
        if not resume_from:
            self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in sorted(params.items())), 0)

    def log_round(self, rec: dict, run_dir: Path) -> None:
        step = int(rec["round"])
        for tag, value in round_scalars(rec).items():
            self.writer.add_scalar(tag, value, step)
        sample = (rec.get("artifacts") or {}).get("samples")
        if sample:
            path = run_dir / sample
            if path.suffix == ".png" and path.exists():
                import numpy as np
                from PIL import Image

                self.writer.add_image("samples", np.asarray(Image.open(path).convert("RGB")), step,
                                      dataformats="HWC")
            elif path.suffix == ".txt" and path.exists():
                self.writer.add_text("samples", path.read_text()[:20_000], step)
        self.writer.flush()

    def log_audits(self, audits: list[dict]) -> None:
        for i, audit in enumerate(audits):
            for key in ("empirical_epsilon", "claimed_epsilon"):
                if (v := _num(audit.get(key))) is not None:
                    self.writer.add_scalar(f"audit/{audit.get('level', 'audit')}/{key}", v, i)
        self.writer.flush()

    def close(self, status: str = "") -> None:
        if self.writer is not None:
            self.writer.close()


class MLflowTracker:
    def __init__(self, uri: str, experiment: str = "fedgen") -> None:
        self.uri, self.experiment = uri, experiment
        self.client = None
        self.run_id = ""
        self.logged: dict[str, set[int]] = {}
        self.existing, self.resume_from = False, 0

    def start(self, run_name: str, params: dict[str, str], fresh: bool, resume_from: int = 0) -> None:
        mlflow = _need("mlflow", "mlflow")
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            # A local database keeps its artifacts beside it, not in whatever folder we run from.
            artifacts = None
            if self.uri.startswith("sqlite:///"):
                db = Path(self.uri.removeprefix("sqlite:///"))
                artifacts = (db.parent.resolve() / f"{db.stem}-artifacts").as_uri()
            exp_id = self.client.create_experiment(self.experiment, artifact_location=artifacts)
        else:
            exp_id = exp.experiment_id
        # Found by a tag of hex digits: a run name may hold quotes that a filter string cannot.
        key = hashlib.sha256(run_name.encode()).hexdigest()[:32]
        found = self.client.search_runs([exp_id], filter_string=f"tags.`fedgen.run-key` = '{key}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            have = found[0].data.params
            self.existing = True
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_name,
                                                 tags={"fedgen.run": run_name, "fedgen.run-key": key}).info.run_id
            have = {}
            self.existing = False  # nothing logged yet: no history to ask for
        # A resumed run trains from resume_from again: its new values are logged at those steps
        # (MLflow keeps points, the later one being the step's value).
        self.resume_from = resume_from
        from mlflow.entities import Param

        new = [Param(k, v[:6000]) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def _steps(self, key: str) -> set[int]:
        if key not in self.logged:
            self.logged[key] = ({m.step for m in self.client.get_metric_history(self.run_id, key)}
                                if self.existing else set())
        return self.logged[key]

    def _log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(1000 * time.time())
        todo = []
        for tag, value in scalars.items():
            key = tag.replace("/", ".")
            if step not in self._steps(key) or (self.resume_from and step >= self.resume_from):
                todo.append(Metric(key, value, now, step))
                self.logged[key].add(step)
        for i in range(0, len(todo), 500):
            self.client.log_batch(self.run_id, metrics=todo[i:i + 500])

    def log_round(self, rec: dict, run_dir: Path) -> None:
        step = int(rec["round"])
        self._log(round_scalars(rec), step)
        sample = (rec.get("artifacts") or {}).get("samples")
        if sample and (run_dir / sample).exists():  # the same path again overwrites: idempotent
            self.client.log_artifact(self.run_id, str(run_dir / sample), artifact_path="samples")

    def log_audits(self, audits: list[dict]) -> None:
        for i, audit in enumerate(audits):
            scalars = {f"audit/{audit.get('level', 'audit')}/{key}": v for key in ("empirical_epsilon",
                                                                                  "claimed_epsilon")
                       if (v := _num(audit.get(key))) is not None}
            self._log(scalars, i)

    def close(self, status: str = "") -> None:
        """Marks the MLflow run ended with the run's own outcome (a run still training stays RUNNING)."""
        state = {"completed": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}.get(status)
        if state and self.client is not None:
            self.client.set_terminated(self.run_id, status=state)


def trackers_for(tensorboard: str | Path | None, mlflow_uri: str | None, experiment: str = "fedgen") -> list:
    out: list = []
    if tensorboard:
        out.append(TensorBoardTracker(tensorboard))
    if mlflow_uri:
        out.append(MLflowTracker(mlflow_uri, experiment))
    return out


def export(run_dir: Path, records: list[dict], config: dict, audits: list[dict], trackers: list,
           status: str = "") -> int:
    """Replay a run's recorded rounds (one record per round: the run store's) into ``trackers``;
    ``status`` is the run's (completed, failed, stopped, running). Returns the rounds exported."""
    params = flat_params(config)
    for tracker in trackers:
        tracker.start(run_dir.name, params, fresh=True)
        try:
            for rec in records:
                tracker.log_round(rec, run_dir)
            if audits:
                tracker.log_audits(audits)
        finally:
            tracker.close(status)
    return len(records)


class LiveTrackers:
    """The server's trackers while a run trains (``run.tensorboard-dir``, ``run.mlflow-uri``).

    The round loop only hands each record to a queue: a thread of its own writes them, so a slow
    tracker never makes a round wait (a full queue drops a record, with one warning). A tracker
    that fails (its store unreachable, its library missing) logs one warning and is dropped; the
    federation never stops for it. At the end the thread gets ``CLOSE_SECONDS`` to finish.
    ``start_round`` > 1: a resumed run, whose rounds from there are logged again."""

    CLOSE_SECONDS = 30.0

    def __init__(self, run_dir: Path, flat_config: dict, tensorboard: str, mlflow_uri: str,
                 experiment: str = "fedgen", start_round: int = 1) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        self.run_dir = run_dir
        self.trackers: list = []
        self.queue: queue.Queue = queue.Queue(maxsize=1000)
        self._dropped = False
        params = flat_params(nested_config(flat_config))
        pending = trackers_for(tensorboard, mlflow_uri, experiment)
        resume_from = start_round if start_round > 1 else 0

        def work() -> None:
            for tracker in pending:
                self._try(tracker, lambda t: t.start(run_dir.name, params, fresh=False, resume_from=resume_from),
                          keep=True)
            while (item := self.queue.get()) is not None:
                for tracker in list(self.trackers):
                    self._try(tracker, lambda t: t.log_round(item, self.run_dir))
            for tracker in list(self.trackers):
                self._try(tracker, lambda t: t.close(self.status))

        self.status = ""
        self.thread = threading.Thread(target=work, name="fedgen-trackers", daemon=True)
        self.thread.start()

    def _try(self, tracker, call, keep: bool = False) -> None:
        try:
            call(tracker)
            if keep:
                self.trackers.append(tracker)
        except Exception as err:  # noqa: BLE001 - a tracker never stops the run
            log.warning("%s: %s; the run goes on without it", type(tracker).__name__, err)
            if tracker in self.trackers:
                self.trackers.remove(tracker)

    def __call__(self, rec: dict) -> None:
        try:
            self.queue.put_nowait(rec)
        except queue.Full:
            if not self._dropped:
                log.warning("the trackers are %d records behind; dropping records until they catch up",
                            self.queue.maxsize)
                self._dropped = True

    def close(self, status: str = "") -> None:
        """Let the trackers finish what is queued (``CLOSE_SECONDS`` at most) and end their runs."""
        self.status = status
        try:
            self.queue.put(None, timeout=self.CLOSE_SECONDS)
        except queue.Full:
            pass
        self.thread.join(self.CLOSE_SECONDS)
        if self.thread.is_alive():
            log.warning("the trackers did not finish within %gs; the run ends without waiting for them",
                        self.CLOSE_SECONDS)
