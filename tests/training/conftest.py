"""Simulated kills: `kill` dies at a chosen filesystem step of a save (the atomic-save tests);
`kill_after_checkpoint` dies right after the Trainer wrote checkpoint-N (the resume tests)."""

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


@pytest.fixture
def kill_after_checkpoint(monkeypatch):
    """kill_after_checkpoint(step) -> undo(): the next Trainer run raises KeyboardInterrupt right after it wrote
    checkpoint-`step`, as if the process were killed there; undo() gives the restarted run the real hook."""
    from transformers.trainer_callback import CallbackHandler

    real_on_save = CallbackHandler.on_save

    def arm(step: int):
        def save_then_die(self, args, state, control):
            control = real_on_save(self, args, state, control)
            if state.global_step == step:
                raise KeyboardInterrupt
            return control

        monkeypatch.setattr(CallbackHandler, "on_save", save_then_die)
        return lambda: monkeypatch.setattr(CallbackHandler, "on_save", real_on_save)

    return arm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, shards): a tiny initialised model and 24 shapes scenes at 32 px, once per module."""
    from mllm.data.shapes import iter_samples
    from mllm.data.shards import write_shards
    from mllm.init import init_model

    root = tmp_path_factory.mktemp("tiny_run")
    model_dir = init_model("tiny", "tiny", root / "m", seed=0)
    write_shards(iter_samples(24, size=32), root / "data")
    return model_dir, root / "data"
