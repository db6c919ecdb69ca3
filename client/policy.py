"""A site's own policy: what it lets a federation do with its records, whatever the server asks (issue 24).

The SuperNode's node config names it (``policy-path``); a TOML file the site's privacy officer
writes, for example::

    max-epsilon = 4.0            # the most this site ever spends on its records (all runs together)
    max-delta = 1e-6
    max-round-epsilon = 1.0      # the most one round may add
    min-noise-multiplier = 0.8
    allowed-families = ["vae", "merf"]
    allowed-datasets = ["image-folder"]
    allowed-paths = ["/data/cardiology/*"]  # the folders the site may read
    release-diagnostics = false  # privacy.diagnostics = "noised" refused
    allow-sample-audits = false
    allowed-runs = ["cardio-*"]  # run.name patterns (fnmatch); empty = any
    require-approval = true      # `fedgen site approve` before a new config trains

Parsed once per message with the same discipline as the run config: unknown keys refused,
every problem reported at once with its fix (:class:`PolicyError`). A site without a policy file
behaves as before (the budget from its node config or the run).

Two moments of checking, both before anything is trained or charged:

- :func:`check_request`: what the run config alone decides (family, dataset, delta when fixed,
  noise when fixed, diagnostics, audits, run name), before the site opens its data;
- :func:`check_plan`: what needs the DP plan, which depends on the site's record count (the
  noise a calibration picks, the round's epsilon, the total), after the data is opened and
  before the charge.

A refusal names the rule and the value asked (:class:`PolicyRefusal`); the site answers
``refused`` with that reason, and the server records it per site as it records a budget refusal.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.config import AppConfig, Family, training_settings


class PolicyError(ValueError):
    """The policy file cannot be used: every problem, each with its fix."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in the site policy {path}:\n"
                         + "\n".join(f"  - {p}" for p in problems))


class PolicyRefusal(RuntimeError):
    """A request the policy refuses: which rule, what was asked, what the rule allows."""

    def __init__(self, rule: str, asked: object, allowed: object) -> None:
        self.rule, self.asked, self.allowed = rule, asked, allowed
        super().__init__(f"refused by the site's policy: {rule} = {allowed!r}, the run asks {asked!r}; "
                         "nothing was trained or spent")


class SitePolicy(BaseModel):
    # strict: "yes" is not true, "4" is not 4 (a policy must say what it means; found by review)
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True,
                              alias_generator=lambda name: name.replace("_", "-"))

    max_epsilon: float = Field(0.0, ge=0, allow_inf_nan=False, description="total epsilon on this site's records; "
                               "0 = the node config's or the run's budget")
    max_delta: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="largest delta a run may use")
    max_round_epsilon: float = Field(0.0, ge=0, allow_inf_nan=False, description="largest epsilon one round may "
                                     "add; 0 = no limit")
    min_noise_multiplier: float = Field(0.0, ge=0, allow_inf_nan=False, description="smallest DP-SGD noise")
    allowed_families: list[Family] = Field([], description="model families allowed; empty = all")
    allowed_datasets: list[str] = Field([], description="data.dataset values allowed; empty = all")
    allowed_paths: list[str] = Field([], description="fnmatch patterns over the folder the site would read (its "
                                     "data-path, else the run's data.path, made absolute); empty = any")
    release_diagnostics: bool = Field(False, description="allow privacy.diagnostics = 'noised' (a charged release)")
    min_diagnostics_noise: float = Field(0.0, ge=0, allow_inf_nan=False,
                                         description="smallest privacy.diagnostics-noise allowed")
    allow_sample_audits: bool = Field(False, description="allow sample-level audits to train on these records")
    allow_without_dp: bool = Field(False, description="allow runs with privacy.enabled = false")
    allowed_runs: list[str] = Field([], description="fnmatch patterns over run.name; empty = any")
    require_approval: bool = Field(False, description="a new run config trains only after `fedgen site approve`")


def load_policy(path: str | Path) -> SitePolicy:
    """The policy in ``path``; :class:`PolicyError` lists every problem at once."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise PolicyError(path, [f"no file at {path}; fix the node config's policy-path"]) from None
    except tomllib.TOMLDecodeError as err:
        raise PolicyError(path, [f"not valid TOML ({err}); fix the file"]) from None
    try:
        return SitePolicy.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(file)"
            if e["type"] == "extra_forbidden":
                problems.append(f"{key}: unknown rule; remove it or check the spelling (rules: "
                                f"{', '.join(f.alias or n for n, f in SitePolicy.model_fields.items())})")
            else:
                field = SitePolicy.model_fields.get(str(e["loc"][0]).replace("-", "_")) if e["loc"] else None
                fix = f"; set it as {field.description}" if field is not None and field.description else ""
                problems.append(f"{key} = {e.get('input')!r}: {e['msg']}{fix}")
        raise PolicyError(path, problems) from None


def config_digest(cfg: AppConfig) -> str:
    """SHA-256 of ``training_settings(cfg)``, what a site's operator approves (all 256 bits: a
    server must not find two configs with one digest); a changed config is a new request. The
    CLI takes a unique prefix."""
    return hashlib.sha256(json.dumps(training_settings(cfg), sort_keys=True, default=str).encode()).hexdigest()


Kind = Literal["train", "audit", "evaluate"]


def check_request(policy: SitePolicy, cfg: AppConfig, kind: Kind, folder: str = "") -> None:
    """The rules the run config alone decides; raises :class:`PolicyRefusal` on the first broken one.
    ``folder``: what the site would read (its ``data-path``, else the run's ``data.path``; '' for
    the data bundled with the code)."""
    p = cfg.privacy
    if policy.allowed_paths:
        where = str(Path(folder).resolve()) if folder else "(bundled data)"
        if not any(fnmatch.fnmatchcase(where, pat) for pat in policy.allowed_paths):
            raise PolicyRefusal("allowed-paths", where, list(policy.allowed_paths))
    if policy.allowed_runs and not any(fnmatch.fnmatchcase(cfg.run.name, pat) for pat in policy.allowed_runs):
        raise PolicyRefusal("allowed-runs", cfg.run.name, list(policy.allowed_runs))
    if policy.allowed_families and cfg.task.family not in policy.allowed_families:
        raise PolicyRefusal("allowed-families", cfg.task.family, list(policy.allowed_families))
    if policy.allowed_datasets and cfg.data.dataset not in policy.allowed_datasets:
        raise PolicyRefusal("allowed-datasets", cfg.data.dataset, list(policy.allowed_datasets))
    if kind == "audit" and not policy.allow_sample_audits:
        raise PolicyRefusal("allow-sample-audits", True, False)
    if kind == "evaluate" or not p.enabled:  # exact metrics, or training without DP: nothing bounds the release
        if not policy.allow_without_dp:
            raise PolicyRefusal("allow-without-dp", "exact metrics" if kind == "evaluate" else
                                "privacy.enabled = false", False)
        return
    if p.delta and p.delta > policy.max_delta:
        raise PolicyRefusal("max-delta", p.delta, policy.max_delta)
    if p.noise_multiplier and p.noise_multiplier < policy.min_noise_multiplier:
        raise PolicyRefusal("min-noise-multiplier", p.noise_multiplier, policy.min_noise_multiplier)
    if p.diagnostics == "noised":
        if not policy.release_diagnostics:
            raise PolicyRefusal("release-diagnostics", "noised", False)
        if p.diagnostics_noise < policy.min_diagnostics_noise:
            raise PolicyRefusal("min-diagnostics-noise", p.diagnostics_noise, policy.min_diagnostics_noise)


def check_plan(policy: SitePolicy, *, noise_multiplier: float, delta: float, spent: float, would: float) -> None:
    """The rules that need the site's DP plan and its ledger: raises :class:`PolicyRefusal`."""
    if delta > policy.max_delta:
        raise PolicyRefusal("max-delta", delta, policy.max_delta)
    if noise_multiplier < policy.min_noise_multiplier:
        raise PolicyRefusal("min-noise-multiplier", round(noise_multiplier, 6), policy.min_noise_multiplier)
    if policy.max_round_epsilon and would - spent > policy.max_round_epsilon:
        raise PolicyRefusal("max-round-epsilon", round(would - spent, 6), policy.max_round_epsilon)
