"""A site's policy, its operator's approvals and its hash-chained log (issue 24), on real rounds
of digits-quick training at one site (client.site.train_round)."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import RecordDict
from typer.testing import CliRunner

from cli.app import app as cli_app
from client.approvals import PENDING, Approvals
from client.audit import AuditRefused, run_sample_audit
from client.policy import PolicyError, load_policy
from client.site import train_round
from client.site_log import SiteLog
from common import records as R
from common.config import parse_node_config
from common.data.site import site_dataset
from common.tasks import build_task
from tests.conftest import quick_config

RELAXED = 'max-epsilon = 100.0\nrequire-approval = false\n'


def site(tmp_path, policy: str | None):
    node = {"partition-id": 0, "num-partitions": 3, "ledger-path": str(tmp_path / "ledger.json")}
    if policy is not None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        (tmp_path / "policy.toml").write_text(policy)
        node["policy-path"] = str(tmp_path / "policy.toml")
    return parse_node_config(node)


def train(cfg, s, rnd=1):
    try:
        data, spec = site_dataset(cfg, s)
        arrays = R.to_arrayrecord(build_task(cfg, spec, torch.device("cpu")).modules)
    except Exception:  # noqa: BLE001 - data the test cannot load (a forbidden folder): the site refuses first
        arrays = R.to_arrayrecord(build_task(quick_config(), site_dataset(quick_config(), s)[1]).modules)
    return train_round(cfg, s, arrays, server_round=rnd, state=RecordDict(), run_id=7, run_name="run-a")


def charges(tmp_path) -> list[dict]:
    path = tmp_path / "ledger.json"
    if not path.exists():
        return []
    return [line for e in json.loads(path.read_text())["entries"].values() for line in e["rounds"]]


# (policy, run-config overrides, the rule the refusal names)
RULES = [
    ('allowed-families = ["gan", "merf"]', {}, "allowed-families"),
    ('allowed-datasets = ["fashion-mnist"]', {}, "allowed-datasets"),
    ('allowed-paths = ["/data/cardiology/*"]', {}, "allowed-paths"),  # the bundled digits: no folder
    ('allowed-paths = ["/data/cardiology/*"]', {"data.dataset": "image-folder", "data.path": "/etc"},
     "allowed-paths"),
    ('allowed-runs = ["cardio-*"]', {"run.name": "oncology"}, "allowed-runs"),
    ("max-delta = 1e-9", {}, "max-delta"),  # the automatic delta: known only once the records are counted
    ("max-delta = 1e-9", {"privacy.delta": 1e-6}, "max-delta"),  # fixed in the config: before the data
    ("min-noise-multiplier = 5.0", {}, "min-noise-multiplier"),  # the calibrated noise (about 1.2)
    ("min-noise-multiplier = 5.0", {"privacy.noise-multiplier": 1.0}, "min-noise-multiplier"),
    ("max-round-epsilon = 0.5", {}, "max-round-epsilon"),  # round 1 of 2 adds about 6.5
    ("release-diagnostics = false", {"privacy.diagnostics": "noised", "privacy.diagnostics-loss-bound": 100.0}, "release-diagnostics"),
    ('release-diagnostics = true\nmin-diagnostics-noise = 50.0',
     {"privacy.diagnostics": "noised", "privacy.diagnostics-loss-bound": 100.0}, "min-diagnostics-noise"),
    ("allow-without-dp = false", {"privacy.enabled": False}, "allow-without-dp"),
]


@pytest.mark.parametrize("policy,overrides,rule", RULES, ids=[f"{r}-{i}" for i, (_, _, r) in enumerate(RULES)])
def test_each_policy_rule_refuses_with_its_name_and_spends_nothing(tmp_path, policy, overrides, rule):
    s = site(tmp_path, policy)
    result = train(quick_config(**overrides), s)
    assert result.status == R.REFUSED_BY_POLICY and result.arrays is None
    assert f"{rule} = " in result.reason and "nothing was trained or spent" in result.reason
    assert charges(tmp_path) == []
    (line,) = SiteLog(s.ledger_path).lines()
    assert line["decision"] == R.REFUSED_BY_POLICY and rule in line["reason"] and line["update"] == ""


def test_a_policy_that_allows_the_run_trains_and_its_max_epsilon_caps_the_budget(tmp_path):
    s = site(tmp_path, 'max-epsilon = 100.0\nallowed-families = ["vae"]\nmin-noise-multiplier = 0.5')
    assert train(quick_config(), s).status == "ok" and len(charges(tmp_path)) == 1
    capped = site(tmp_path / "b", "max-epsilon = 1.0")  # the run's budget is 8: the policy's 1 wins
    result = train(quick_config(), capped)
    assert result.status == R.REFUSED_BY_POLICY and "max-epsilon = 1.0" in result.reason
    assert charges(tmp_path / "b") == []


def test_max_epsilon_caps_the_site_over_every_way_its_records_are_loaded(tmp_path):
    """Found by review: the ledger keys a spend by the loaded tensors, which the run's settings
    decide (data.image-size): the same records loaded another way were a fresh entry with a fresh
    budget. The cap composes every entry of the site's ledger."""
    s = site(tmp_path, "max-epsilon = 9.0")
    for rnd in (1, 2):  # the first run: its 8
        assert train(quick_config(), s, rnd).status == "ok"
    other = train(quick_config(**{"data.image-size": 9}), s)  # the same records, resized: another key
    assert other.status == R.REFUSED_BY_POLICY and "max-epsilon = 9.0" in other.reason
    assert len(charges(tmp_path)) == 2


def test_a_malformed_policy_stops_the_site_with_every_problem_listed(tmp_path):
    s = site(tmp_path, 'max-epsilon = -1\nallowed-families = ["diffusion"]\nmax-epsilom = 3\n')
    with pytest.raises(PolicyError) as err:
        train(quick_config(), s)
    text = str(err.value)
    assert "3 problem(s)" in text and "max-epsilon" in text and "allowed-families" in text
    assert "max-epsilom: unknown rule" in text
    assert charges(tmp_path) == []
    with pytest.raises(PolicyError, match="not valid TOML"):
        (tmp_path / "bad.toml").write_text("max-epsilon = [")
        load_policy(tmp_path / "bad.toml")


def test_a_new_config_awaits_approval_then_trains_and_a_changed_one_is_a_new_request(tmp_path):
    s = site(tmp_path, RELAXED.replace("false", "true"))
    cfg = quick_config()
    first = train(cfg, s)
    assert first.status == R.AWAITING_APPROVAL and "fedgen site approve" in first.reason and charges(tmp_path) == []
    (req,) = Approvals(s.ledger_path).requests(PENDING)
    assert req["family"] == "vae" and req["planned_epsilon"] == 8.0 and req["rounds"] == 2

    runner = CliRunner()
    listed = runner.invoke(cli_app, ["site", "pending", "--ledger", s.ledger_path, "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout)[0]["digest"] == req["digest"]
    approved = runner.invoke(cli_app, ["site", "approve", req["digest"][:6], "--ledger", s.ledger_path])
    assert approved.exit_code == 0, approved.output
    assert train(cfg, s).status == "ok" and len(charges(tmp_path)) == 1

    changed = quick_config(**{"train.lr": 0.001})
    assert train(changed, s).status == R.AWAITING_APPROVAL
    new = [r for r in Approvals(s.ledger_path).requests(PENDING)]
    assert len(new) == 1 and new[0]["digest"] != req["digest"]
    assert runner.invoke(cli_app, ["site", "reject", new[0]["digest"], "--ledger", s.ledger_path]).exit_code == 0
    refused = train(changed, s)
    assert refused.status == R.REFUSED_BY_POLICY and "rejected" in refused.reason and len(charges(tmp_path)) == 1
    unknown = runner.invoke(cli_app, ["site", "approve", "ffff", "--ledger", s.ledger_path])
    assert unknown.exit_code == 1 and "no request matches" in unknown.output


def _logged_rounds(tmp_path):
    s = site(tmp_path, RELAXED)
    cfg = quick_config()
    for rnd in (1, 2):
        assert train(cfg, s, rnd).status == "ok"
    assert train(quick_config(**{"task.family": "gan"}), site(tmp_path, 'allowed-families = ["vae"]')).status \
        == R.REFUSED_BY_POLICY
    return s, SiteLog(s.ledger_path)


def test_the_log_and_the_ledger_agree_on_every_charge(tmp_path):
    s, site_log = _logged_rounds(tmp_path)
    lines = site_log.lines()
    assert [line["decision"] for line in lines] == ["ok", "ok", R.REFUSED_BY_POLICY]
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    (entry,) = ledger["entries"].values()
    trained = [line for line in lines if line["decision"] == "ok"]
    assert [(c["round"], c["request"], c["steps"]) for c in entry["rounds"]] == \
        [(line["round"], line["request"], line["steps"]) for line in trained]
    assert trained[-1]["epsilon"] == pytest.approx(entry["epsilon"])
    assert all(line["config"] and line["model"] and line["update"] for line in trained)
    assert trained[0]["model"] != trained[0]["update"]


def test_the_hash_chain_detects_an_edited_a_removed_and_a_truncated_line(tmp_path):
    s, site_log = _logged_rounds(tmp_path)
    assert site_log.verify().ok and site_log.verify().lines == 3
    original = site_log.path.read_text().splitlines(keepends=True)

    edited = json.loads(original[1])
    edited["epsilon"] = 0.5  # a smaller spend than was charged
    site_log.path.write_text(original[0] + json.dumps(edited, sort_keys=True) + "\n" + original[2])
    v = site_log.verify()
    assert not v.ok and v.broken_at == 2 and "edited" in v.reason
    result = CliRunner().invoke(cli_app, ["site", "log", "--verify", "--ledger", s.ledger_path])
    assert result.exit_code == 1 and "line 2" in result.output

    site_log.path.write_text(original[0] + original[2])  # the second line removed
    v = site_log.verify()
    assert not v.ok and v.broken_at == 2 and "removed" in v.reason

    site_log.path.write_text("".join(original[:2]))  # the last line removed
    v = site_log.verify()
    assert not v.ok and "removed from its end" in v.reason

    site_log.path.write_text("".join(original))
    assert site_log.verify().ok
    shown = CliRunner().invoke(cli_app, ["site", "status", "--ledger", s.ledger_path, "--policy",
                                         str(tmp_path / "policy.toml"), "--json"])
    assert shown.exit_code == 0, shown.output
    payload = json.loads(shown.stdout)
    assert payload["log"] == {"lines": 3, "intact": True, "head": site_log.verify().head}
    assert payload["spend"][0]["rounds"] == 2 and payload["policy"]["allowed-families"] == ["vae"]


def test_a_sample_audit_is_refused_unless_the_policy_allows_it(tmp_path):
    s = site(tmp_path, "allow-sample-audits = false")
    with pytest.raises(AuditRefused, match="allow-sample-audits"):
        run_sample_audit(quick_config(), s, num_canaries=8)
    assert charges(tmp_path) == []


def test_evaluation_needs_approval_too_and_is_logged(tmp_path):
    """Found by review: evaluate answered exact metrics for a config nobody approved."""
    from client.site import evaluate_round

    s = site(tmp_path, "require-approval = true\nallow-without-dp = true")
    cfg = quick_config(**{"privacy.enabled": False})
    data, spec = site_dataset(cfg, s)
    arrays = R.to_arrayrecord(build_task(cfg, spec, torch.device("cpu")).modules)
    with pytest.raises(PermissionError, match="awaiting approval"):
        evaluate_round(cfg, s, arrays)
    (req,) = Approvals(s.ledger_path).requests(PENDING)
    assert req["dp"] is False and req["settings"]["privacy"]["enabled"] is False and len(req["digest"]) == 64
    Approvals(s.ledger_path).set(req["digest"], "approved")
    assert "neg-elbo" in evaluate_round(cfg, s, arrays)
    assert [(line["kind"], line["decision"]) for line in SiteLog(s.ledger_path).lines()] == \
        [("evaluate", R.AWAITING_APPROVAL), ("evaluate", "ok")]


def test_a_malformed_policy_and_a_refused_audit_are_logged(tmp_path):
    s = site(tmp_path, "max-epsilom = 3")
    with pytest.raises(PolicyError):
        train(quick_config(), s)
    s2 = site(tmp_path / "b", "allow-sample-audits = false")
    with pytest.raises(AuditRefused):
        run_sample_audit(quick_config(), s2, num_canaries=8)
    assert [line["decision"] for line in SiteLog(s.ledger_path).lines()] == ["failed"]
    assert [(line["kind"], line["decision"]) for line in SiteLog(s2.ledger_path).lines()] == [("audit", "refused")]


def test_a_damaged_head_is_reported_not_fatal_and_an_interrupted_append_is_not_tampering(tmp_path):
    """Found by review: an unreadable head made every later request fail after its charge, and
    a crash between a line and its head looked like lines cut from the end."""
    s, site_log = _logged_rounds(tmp_path)
    site_log.head_path.write_text("garbage")
    v = site_log.verify()
    assert not v.ok and "head" in v.reason and "unreadable" in v.reason
    def another_request():  # refused by the policy, and logged like every request
        gan = quick_config(**{"task.family": "gan"})
        assert train(gan, site(tmp_path, 'allowed-families = ["vae"]')).status == R.REFUSED_BY_POLICY

    another_request()  # the site goes on; the new line chains to the file's last line
    assert site_log.verify().ok and json.loads(site_log.head_path.read_text())["lines"] == 4
    lines = site_log.lines()
    site_log.head_path.write_text(json.dumps({"hash": lines[-2]["hash"], "lines": len(lines) - 1}))
    v = site_log.verify()  # as after a crash between the last line and its head
    assert v.ok and "interrupted" in v.reason
    another_request()
    assert site_log.verify().ok and site_log.verify().lines == 5
