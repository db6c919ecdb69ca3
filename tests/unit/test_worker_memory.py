"""client.worker frees what a task leaves behind: its reference cycles at once, an old app's when a new one loads."""

from __future__ import annotations

import gc
import weakref

from client import worker as W


class _Node:
    pass


def _cycle() -> _Node:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return a


def test_a_tasks_cycles_are_freed_after_it_and_a_replaced_apps_once_the_new_app_is_loaded():
    enabled = gc.isenabled()
    gc.disable()  # only the worker's own collection may free these cycles
    try:
        app = _cycle()
        old_app = weakref.ref(app)
        W._settle_memory(keep=True, unkeep=False)  # the first task imported the app: what is alive is frozen
        assert gc.get_freeze_count() > 0

        task_garbage = weakref.ref(_cycle())  # a cycle a task made and dropped
        assert task_garbage() is not None
        assert W._settle_memory(keep=False, unkeep=False) >= 0
        assert task_garbage() is None, "a task's reference cycle outlived the task"

        survivor = _cycle()  # lives through a task that did not import an app: not frozen
        later_garbage = weakref.ref(survivor)
        W._settle_memory(keep=False, unkeep=False)
        del survivor
        W._settle_memory(keep=False, unkeep=False)
        assert later_garbage() is None, "a cleanup that did not keep anything froze what was alive"

        del app  # a new app package replaces the old one: the old one's cycles are garbage, but frozen
        W._settle_memory(keep=False, unkeep=False)
        assert old_app() is not None  # a plain collection does not look at frozen objects
        W._settle_memory(keep=True, unkeep=True)  # the task that imported the new app
        assert old_app() is None, "the replaced app's frozen cycles were never freed"
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()
