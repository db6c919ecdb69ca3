"""A site operator's approval of what runs on its records (``require-approval = true`` in its policy).

The first time a run config asks the site to train, the site refuses ("awaiting approval") and
records the request here, beside its ledger (``<ledger>.approvals.json``, under the ledger's
lock): the run's name, the config's digest (``client.policy.config_digest``), the family, the
dataset, the planned epsilon and rounds. The operator lists and decides with the CLI on the
site's machine (``fedgen site pending``, ``fedgen site approve DIGEST``, ``fedgen site reject
DIGEST``). An approved digest trains from then on; a rejected one is refused; a changed config
has another digest, hence is a new request.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from client.privacy_state import Ledger
from common.atomic import write_bytes

APPROVED, REJECTED, PENDING = "approved", "rejected", "pending"


class ApprovalError(ValueError):
    """An approval command that cannot be done (unknown digest, already decided)."""


class Approvals:
    def __init__(self, ledger_path: str | Path) -> None:
        ledger_path = Path(ledger_path)
        self.path = ledger_path.with_name(ledger_path.name + ".approvals.json")
        self._ledger = Ledger(ledger_path)

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"requests": {}}

    def _write(self, data: dict) -> None:
        write_bytes(self.path, json.dumps(data, indent=1, sort_keys=True).encode())

    def decide(self, digest: str, request: dict) -> str:
        """This request's standing (approved, rejected or pending); a new one is recorded as pending."""
        with self._ledger.locked():
            data = self._read()
            known = data["requests"].get(digest)
            if known is None:
                data["requests"][digest] = {**request, "digest": digest, "state": PENDING, "asked": time.time()}
                self._write(data)
                return PENDING
            return known["state"]

    def requests(self, state: str | None = None) -> list[dict]:
        return [r for r in self._read()["requests"].values() if state is None or r["state"] == state]

    def set(self, digest: str, state: str) -> dict:
        """Approve or reject a request by its digest (a unique prefix will do)."""
        with self._ledger.locked():
            data = self._read()
            matches = [d for d in data["requests"] if d.startswith(digest)] if digest else []
            if len(matches) != 1:
                known = ", ".join(sorted(data["requests"])) or "none"
                raise ApprovalError(f"{'no' if not matches else 'more than one'} request matches {digest!r} "
                                    f"(requests: {known}); see `fedgen site pending`")
            req = data["requests"][matches[0]]
            req.update({"state": state, "decided": time.time()})
            self._write(data)
            return req
