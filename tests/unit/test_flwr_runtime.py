"""common/flwr_runtime.py reaches into Flower's internals: this fails, naming what moved, when they change."""

from __future__ import annotations

import inspect
import sys
import time
import tomllib
import types

import pytest
from packaging.requirements import Requirement

from common import flwr_runtime as FR
from tests.conftest import ROOT


def test_pyproject_pins_exactly_the_flwr_this_module_was_written_for():
    deps = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    (flwr,) = [d for d in deps if d.name == "flwr"]
    assert str(flwr.specifier) == f"=={FR.FLWR_VERSION}", \
        f"pyproject pins {flwr.specifier}; common/flwr_runtime.py needs flwr=={FR.FLWR_VERSION} exactly"
    FR.check_flwr_version()  # the installed one


def test_another_flwr_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.setattr(FR, "version", lambda _name: "9.9.9")
    with pytest.raises(RuntimeError, match=r"flwr 9\.9\.9 is installed: install flwr==1\.41\.0"):
        FR.check_flwr_version()


@pytest.mark.parametrize("func, params", [
    (FR.pull_task_input, ["client"]),
    (FR.push_message, ["client", "message", "context"]),
    (FR.push_task_output, ["client", "context", "sub_status", "details"]),
    (FR.get_load_client_app_fn, ["default_app_ref", "app_path", "multi_app"]),
    (FR.get_project_dir, ["fab_id", "fab_version", "fab_hash"]),
    (FR.make_task_heartbeat_fn_http, ["client"]),
])
def test_the_flower_functions_the_worker_calls_keep_their_parameters(func, params):
    got = list(inspect.signature(func).parameters)
    assert got[:len(params)] == params, (f"{func.__module__}.{func.__name__}{inspect.signature(func)} changed; "
                                         f"common/flwr_runtime.py calls it with {params}: port it")


def test_the_flower_classes_and_constants_the_worker_uses_are_there():
    assert "skip_prompt" in inspect.signature(FR.install_from_fab).parameters
    assert {"server_address", "insecure", "root_certificates", "interceptors", "retry_invoker"} <= set(
        inspect.signature(FR.RuntimeHttpClient.from_server_address).parameters)
    for method in ("AcquireTask", "PullTaskInput", "PullMessages", "PushMessages", "PushTaskOutput", "close"):
        assert hasattr(FR.RuntimeHttpClient, method), f"RuntimeHttpClient.{method} is gone: port common/flwr_runtime.py"
    assert FR.TaskType.CLIENT_APP.value == "flwr-clientapp"
    assert {"master_secret", "protected_methods"} <= set(inspect.signature(FR.SuperExecAuthHttpInterceptor).parameters)
    assert FR.SubStatus.COMPLETED and FR.SubStatus.FAILED and FR.ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def test_the_task_input_is_pulled_with_short_retries(monkeypatch):
    from flwr.supernode.runtime import run_clientapp

    assert "pull_and_inflate_object_from_tree(" in inspect.getsource(run_clientapp.pull_task_input), \
        "pull_task_input no longer pulls through pull_and_inflate_object_from_tree: port common/flwr_runtime._quick_pulls"
    params = inspect.signature(run_clientapp.pull_and_inflate_object_from_tree).parameters
    assert {"initial_backoff", "backoff_cap"} <= set(params), "the pull's backoff parameters changed: port _quick_pulls"
    seen = {}
    monkeypatch.setattr(run_clientapp, "pull_and_inflate_object_from_tree", lambda *a, **kw: seen.update(kw))
    FR._quick_pulls()
    run_clientapp.pull_and_inflate_object_from_tree("tree", "pull", "confirm", return_type=object)
    assert seen == {"return_type": object, "initial_backoff": FR.PULL_INITIAL_BACKOFF, "backoff_cap": FR.PULL_BACKOFF_CAP,
                    "max_tries_per_object": None}
    FR._quick_pulls()  # applied again (a second TaskRunner): the wrappers do not stack
    assert run_clientapp.pull_and_inflate_object_from_tree.__wrapped__.__name__ == "<lambda>"  # one layer
    seen.clear()
    run_clientapp.pull_and_inflate_object_from_tree("tree", "pull", "confirm", return_type=object, initial_backoff=3)
    assert seen["initial_backoff"] == 3 and seen["backoff_cap"] == FR.PULL_BACKOFF_CAP


def test_the_serverapp_pulls_a_replys_arrays_with_short_retries(monkeypatch):
    from flwr.superlink.grid import http_grid

    assert "pull_objects(" in inspect.getsource(http_grid.HttpGrid.pull_messages), \
        "HttpGrid.pull_messages no longer pulls a reply's arrays with pull_objects: port quick_reply_pulls"
    assert {"initial_backoff", "backoff_cap", "max_tries_per_object"} <= set(
        inspect.signature(http_grid.pull_objects).parameters), "pull_objects' backoff parameters changed"
    seen = {}
    monkeypatch.setattr(http_grid, "pull_objects", lambda *a, **kw: seen.update(kw))
    FR.quick_reply_pulls()
    FR.quick_reply_pulls()  # twice (a second run in the same process): one layer
    http_grid.pull_objects(object_ids=[], pull_object_fn=None)
    assert seen == {"object_ids": [], "pull_object_fn": None, "initial_backoff": 0.02, "backoff_cap": 0.5,
                    "max_tries_per_object": None}
    assert http_grid.pull_objects.__wrapped__.__name__ == "<lambda>"


def test_the_supernode_still_waits_three_seconds_and_half_a_second_with_the_time_module():
    source = inspect.getsource(FR.start_client_internal)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source, \
        "flwr.supernode.start_client_internal's fixed waits changed: port common/flwr_runtime.fast_polls"


def test_fast_polls_caps_the_supernodes_waits(monkeypatch):
    slept, pulled = [], {}
    monkeypatch.setattr(FR.start_client_internal, "time", time)
    assert "pull_objects(" in inspect.getsource(FR.start_client_internal), \
        "the SuperNode no longer pulls a message's arrays with pull_objects: port fast_polls"
    assert {"initial_backoff", "backoff_cap"} <= set(inspect.signature(FR.start_client_internal.pull_objects).parameters)
    monkeypatch.setattr(FR.start_client_internal, "pull_objects", lambda *a, **kw: pulled.update(kw))
    monkeypatch.setattr(time, "sleep", slept.append)
    FR.fast_polls(idle=0.2, reply=0.05)
    patched = FR.start_client_internal.time
    patched.sleep(3)
    patched.sleep(0.5)
    patched.sleep(0.01)
    assert slept == [0.2, 0.05, 0.01]
    FR.start_client_internal.pull_objects(["id"], pull_object_fn=print)
    assert pulled == {"pull_object_fn": print, "initial_backoff": 0.01, "backoff_cap": FR.PULL_BACKOFF_CAP,
                      "max_tries_per_object": None}
    assert patched.monotonic is time.monotonic  # everything else is the real time module
    with pytest.raises(RuntimeError, match="port fast_polls"):
        FR.fast_polls()  # already patched: not the time module any more


def test_a_new_app_package_replaces_the_modules_of_the_old_one(tmp_path, monkeypatch):
    old, new = tmp_path / "old", tmp_path / "new"
    for d in (old, new):
        (d / "fgpkg").mkdir(parents=True)
        (d / "fgpkg" / "__init__.py").write_text("")
    stale = types.ModuleType("fgpkg.mod")
    stale.__file__ = str(old / "fgpkg" / "mod.py")
    current = types.ModuleType("fgpkg.cur")
    current.__file__ = str(new / "fgpkg" / "cur.py")
    other = types.ModuleType("fgother")
    other.__file__ = str(old / "fgother.py")
    for m in (stale, current, other):
        monkeypatch.setitem(sys.modules, m.__name__, m)
    monkeypatch.setattr(sys, "path", [str(old), *sys.path])
    FR._drop_app_modules(new.resolve(), old.resolve())
    assert "fgpkg.mod" not in sys.modules  # the old package's code never runs again
    assert sys.modules["fgpkg.cur"] is current  # already the new package's
    assert sys.modules["fgother"] is other  # not a package of the new app: left alone
    assert str(old.resolve()) not in sys.path


class _FakeHeartbeat:
    def __init__(self, _fn) -> None:
        self.is_running = False

    def start(self) -> None:
        self.is_running = True

    def stop(self) -> None:
        self.is_running = False


def _fake_runtime(monkeypatch, pushed: list) -> None:
    """TaskRunner with the SuperNode's Runtime API replaced by fakes: a task is a train message."""
    from flwr.app import Context, Message, RecordDict

    closed = []
    monkeypatch.setattr(FR, "runtime_client", lambda *a, **kw: types.SimpleNamespace(close=lambda: closed.append(1)))
    monkeypatch.setattr(FR, "HeartbeatSender", _FakeHeartbeat)
    monkeypatch.setattr(FR, "make_task_heartbeat_fn_http", lambda client: None)

    def pull(_client):
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 7, 1, 1  # as flwr's pull sets them
        msg = Message(RecordDict(), dst_node_id=1, message_type="train")
        ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        return msg, ctx, types.SimpleNamespace(fab_id="x/y", fab_version="1", run_id=1), \
            types.SimpleNamespace(hash_str="h1", content=b"")

    monkeypatch.setattr(FR, "pull_task_input", pull)
    monkeypatch.setattr(FR, "push_message", lambda client, reply, context: pushed.append(reply))
    monkeypatch.setattr(FR, "push_task_output", lambda **kw: pushed.append(kw["sub_status"]))


def test_a_clientapp_exception_becomes_an_error_reply_and_the_runner_serves_the_next_task(monkeypatch):
    from flwr.app import Message, RecordDict

    pushed: list = []
    _fake_runtime(monkeypatch, pushed)
    calls = []

    def app(message, context):
        calls.append(1)
        if len(calls) == 1:
            raise ZeroDivisionError("boom")
        return Message(RecordDict(), reply_to=message)

    runner = FR.TaskRunner("127.0.0.1:1", insecure=True, root_certificates=None)
    monkeypatch.setattr(runner, "_load", lambda *a: setattr(runner, "_app", app) or True)
    first = runner.run("token-1")
    assert first.status == FR.SubStatus.FAILED and "boom" in first.details
    reply, status = pushed
    assert reply.has_error() and reply.error.code == FR.ErrorCode.CLIENT_APP_RAISED_EXCEPTION and status == first.status
    pushed.clear()
    second = runner.run("token-2")
    assert second.status == FR.SubStatus.COMPLETED and not pushed[0].has_error() and len(calls) == 2


def test_a_failed_load_of_a_new_app_version_leaves_no_app_behind(monkeypatch, tmp_path):
    pushed: list = []
    _fake_runtime(monkeypatch, pushed)
    runner = FR.TaskRunner("127.0.0.1:1", insecure=True, root_certificates=None)
    runner._app, runner._fab_hash, runner._app_dir = (lambda **kw: None), "h0", tmp_path  # an older version, loaded
    monkeypatch.setattr(FR, "install_from_fab", lambda content, skip_prompt: None)
    monkeypatch.setattr(FR, "get_project_dir", lambda *a: tmp_path / "new")
    (tmp_path / "new").mkdir()

    def broken_loader(**kw):
        def load(*a):
            raise SyntaxError("the new version does not import")
        return load

    monkeypatch.setattr(FR, "get_load_client_app_fn", broken_loader)
    out = runner.run("token")
    assert out.status == FR.SubStatus.FAILED and "does not import" in out.details
    assert runner._app is None and runner._fab_hash is None  # the next task loads again, never the half-replaced one
    assert (runner.loads, runner.forgets) == (0, 1)  # the old app was let go (client.worker frees it)

    monkeypatch.setattr(FR, "get_load_client_app_fn", lambda **kw: lambda *a: (lambda **k: None))
    runner.run("token")  # the new version fixed: it loads; nothing was loaded to let go
    runner.run("token")  # the same package: kept
    assert (runner.loads, runner.forgets) == (1, 1)
    runner._fab_hash = "h0"  # as if that app were another package than the next task's
    runner.run("token")  # a new version that loads: the old app let go, the new one imported
    assert (runner.loads, runner.forgets) == (2, 2)


def test_the_loopback_deployment_names_flowers_in_memory_state():
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

    from simulations.deployment import FLWR_IN_MEMORY_DB

    assert FLWR_IN_MEMORY_DB == FLWR_IN_MEMORY_DB_NAME, (
        f"flwr's in-memory SuperLink state is now called {FLWR_IN_MEMORY_DB_NAME!r}: update simulations/deployment.py")
