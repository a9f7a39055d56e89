"""Ray Tune's registry of trainables, made safe to use from several threads of one process.

Cause (issue 14.7, ``RuntimeError: dictionary changed size during iteration`` in
``tests/test_tune.py:105``, a searcher's ``add_configurations``): every Tune experiment registers its
trainable in the process-wide ``ray.tune.registry._global_registry``. ``_Registry.register`` adds the
pickled trainable to the dict ``_to_flush`` and, once Ray is up, calls ``flush_values``, which iterates
``_to_flush`` while it writes each entry to the GCS (``ray/tune/registry.py:286-293``, Ray 2.60). The GCS
write releases the GIL, so a second thread that registers at that moment (another searcher or Tuner, or
``ray.init``'s post-init hook, ``registry.py:297``, when Ray starts in another thread) changes the dict
under the iteration. Nothing in Ray locks it. (Which second thread did it in the failing suite run, where the
session's Ray start had timed out, is not known: only the main thread's traceback was kept; no test but
test_tune's registers trainables.) Reproduced: two threads registering trainables, one
through ``BasicVariantGenerator.add_configurations``, raise this error within a second with a short
thread switch interval (``tests/test_tune.py::test_trainables_register_from_several_threads``).

``guard_ray_tune_registry()`` wraps the registry's methods that read or change ``_to_flush`` in one
process-wide lock and makes ``flush_values`` iterate a snapshot. Idempotent; called before this project
builds a searcher or a Tuner (``tune.search``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_LOCK = threading.RLock()  # re-entrant: register() calls flush_values()
_GUARDED = "_dual_attention_thread_safe"


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return method(self, *args, **kwargs)

    locked.__name__ = method.__name__
    locked.__doc__ = method.__doc__
    return locked


def _flush_snapshot(self: Any) -> None:
    """``_Registry.flush_values`` over a snapshot: entries added meanwhile stay for the next flush."""
    from ray.experimental.internal_kv import _internal_kv_put
    from ray.tune.registry import _make_key

    with _LOCK:
        self._register_atexit()
        for (category, key), value in list(self._to_flush.items()):
            _internal_kv_put(_make_key(self.prefix, category, key), value, overwrite=True)
            self._registered.add((category, key))
            if self._to_flush.get((category, key)) is value:
                del self._to_flush[(category, key)]


def guard_ray_tune_registry() -> None:
    """Make ``ray.tune.registry._Registry`` thread-safe in this process (see the module's docstring)."""
    import ray._private.worker
    from ray.tune import registry

    cls = registry._Registry
    with _LOCK:
        if getattr(cls, _GUARDED, False):
            return
        unguarded_flush = cls.flush_values
        for name in ("register", "unregister", "unregister_all", "contains", "get"):
            setattr(cls, name, _locked(getattr(cls, name)))
        cls.flush_values = _flush_snapshot
        setattr(cls, _GUARDED, True)
        # Ray appended the unguarded bound method as a post-init hook when it imported the registry.
        hooks = ray._private.worker._post_init_hooks
        for index, hook in enumerate(hooks):
            if getattr(hook, "__func__", None) is unguarded_flush:
                hooks[index] = hook.__self__.flush_values
