"""`kill`: a process killed at a chosen filesystem step of a save, for the atomic-save tests."""

import os
import shutil

import pytest


class Kill:
    """Count the filesystem steps that move or delete (rename, replace, unlink, rmdir, rmtree); at step `at`
    raise KeyboardInterrupt, and from then on do nothing, as a SIGKILLed process does: the cleanup code the
    exception runs through changes no file. `disarm()` restores the real calls (the restarted process)."""

    OPS = ((os, "rename"), (os, "replace"), (os, "unlink"), (os, "rmdir"), (shutil, "rmtree"))

    def __init__(self, monkeypatch, at: int) -> None:
        self.at, self.count, self.fired, self.armed = at, 0, False, True
        for module, name in self.OPS:
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name)))

    def _wrap(self, real):
        def op(*args, **kwargs):
            if not self.armed:
                return real(*args, **kwargs)
            if self.fired:
                return None
            self.count += 1
            if self.count == self.at:
                self.fired = True
                raise KeyboardInterrupt(f"killed at filesystem step {self.at}")
            return real(*args, **kwargs)

        return op

    def die(self) -> None:
        """Be killed now (whatever step the count is at)."""
        self.fired = True
        raise KeyboardInterrupt("killed")

    def disarm(self) -> None:
        self.armed = False


@pytest.fixture
def kill(monkeypatch):
    """kill(at) -> Kill armed to die at filesystem step `at` (1-based)."""
    made = []

    def arm(at: int) -> Kill:
        made.append(Kill(monkeypatch, at))
        return made[-1]

    yield arm
    for k in made:
        k.disarm()
