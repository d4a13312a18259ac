"""Process-wide settings that a call changes for its duration, shared by calls in several
threads: a model's train/eval modes, PyTorch's TF32 flags.

Saving the setting on entry and restoring it on exit breaks as soon as two threads overlap:
the first to finish restores the old setting under the other's feet. Here the first call
applies the setting (keeping what was there), calls that want the same join it, a call that
wants a different one waits until they are done, and the last to leave restores.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Hashable


class SharedSetting:
    """``held(key, want, apply, restore)``: run the block with the setting ``key`` at ``want``.
    ``apply()`` sets it and returns what to restore; ``restore(saved)`` puts that back."""

    def __init__(self):
        self._changed = threading.Condition()
        self._held: dict[Hashable, list] = {}  # key -> [want, calls inside, what apply() saved]

    @contextlib.contextmanager
    def held(self, key: Hashable, want: Hashable, apply: Callable[[], Any], restore: Callable[[Any], None]):
        with self._changed:
            self._changed.wait_for(lambda: key not in self._held or self._held[key][0] == want)
            if key not in self._held:
                self._held[key] = [want, 0, apply()]
            entry = self._held[key]
            entry[1] += 1
        try:
            yield
        finally:
            with self._changed:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._held[key]
                    restore(entry[2])
                    self._changed.notify_all()


SETTINGS = SharedSetting()
