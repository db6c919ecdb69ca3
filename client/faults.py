"""Fault injection for tests and drills: make chosen sites misbehave on purpose.

Off unless the environment variable ``FEDGEN_INJECT_FAULTS`` is set on the site's
process, e.g. ``FEDGEN_INJECT_FAULTS="0:nan,1:shape@2,2:norm"``: partition 0 replies
NaN weights every round, partition 1 a wrongly shaped array in round 2, partition 2 an
update scaled a million-fold (a poisoning attempt); ``crash`` raises inside the ClientApp.
Never set it on a real site.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from flwr.app import Array, ArrayRecord

log = logging.getLogger(__name__)

ENV = "FEDGEN_INJECT_FAULTS"
KINDS = ("nan", "shape", "norm", "crash")


def planned_fault(partition_id: int, server_round: int) -> str | None:
    spec = os.environ.get(ENV, "").strip()
    for item in filter(None, (x.strip() for x in spec.split(","))):
        pid, _, rest = item.partition(":")
        kind, _, rnd = rest.partition("@")
        if kind not in KINDS:
            raise ValueError(f"{ENV}: unknown fault {kind!r} in {item!r}; use one of {KINDS}")
        if int(pid) == partition_id and (not rnd or int(rnd) == server_round):
            return kind
    return None


def corrupt(arrays: ArrayRecord, kind: str, global_arrays: ArrayRecord) -> ArrayRecord:
    out = {}
    first = True
    for key, arr in arrays.items():
        x = arr.numpy().copy()
        if first and np.issubdtype(x.dtype, np.floating):
            if kind == "nan":
                x.flat[0] = np.nan
            elif kind == "shape":
                x = np.concatenate([x.ravel(), np.zeros(1, dtype=x.dtype)])
            first = False
        if kind == "norm" and np.issubdtype(x.dtype, np.floating):
            g = global_arrays[key].numpy()
            x = g + (x - g) * 1e6 + 1e3
        out[key] = Array(np.ascontiguousarray(x))
    log.warning("fault injection: replying with a %s update", kind)
    return ArrayRecord(out)
