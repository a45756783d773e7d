"""Resumable training checkpoints without pickle.

A checkpoint is a folder: the model in safetensors (through the model's own
`save_pretrained`), optimizer and scheduler state dicts saved with `torch.save` and read back
with `weights_only=True` (plain tensors and numbers only), RNG states as tensors, and a JSON
file with the step and the data position. It is saved with `mllm.io.write_dir`: written to a hidden
temporary folder, fsynced, and renamed into place (a checkpoint it replaces is moved aside first and
deleted only once the new one is in), so a run killed mid-save never leaves a checkpoint that looks
complete, and never loses the one it was replacing. Before resuming, the main process recovers what
such a kill left behind with `mllm.io.recover_leftovers(parent)`.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllm.io import write_dir

STATE_FILE = "trainer_state.json"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": json.dumps(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    python_state = json.loads(state["python"])
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))


def save_checkpoint(
    folder: str | Path,
    save_model: Callable[[Path], None],
    stateful: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write `folder` atomically.

    `stateful` maps names to objects with `state_dict()` (optimizers, schedulers); `state` must be
    JSON-serialisable (step, data position, ...).
    """
    folder = Path(folder)

    def write(tmp: Path) -> None:
        save_model(tmp / "model")
        blob = {name: obj.state_dict() for name, obj in stateful.items()}
        blob["rng"] = rng_state()
        torch.save(blob, tmp / "training_state.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))

    write_dir(folder, write)
    _prune(folder.parent, keep)
    return folder


def _prune(parent: Path, keep: int) -> None:
    checkpoints = sorted(list_checkpoints(parent), key=lambda p: int(p.name.split("-")[-1]))
    for old in checkpoints[:-keep]:
        (old / STATE_FILE).unlink(missing_ok=True)  # first: a deletion cut short never looks complete
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(parent: str | Path) -> list[Path]:
    parent = Path(parent)
    if not parent.is_dir():
        return []
    return [p for p in parent.glob("step-*") if (p / STATE_FILE).is_file() and p.name.split("-")[-1].isdigit()]


def latest_checkpoint(parent: str | Path) -> Path | None:
    """The newest complete checkpoint under `parent`."""
    checkpoints = list_checkpoints(parent)
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1])) if checkpoints else None


def load_training_state(folder: str | Path, stateful: dict[str, Any]) -> dict[str, Any]:
    """Restore the `stateful` objects saved under the same names, and the RNGs; return the JSON state."""
    folder = Path(folder)
    blob = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    missing = sorted(set(stateful) - set(blob))
    if missing:
        raise ValueError(f"checkpoint {folder} has no state for {', '.join(missing)}; it was made by another recipe")
    for name, obj in stateful.items():
        obj.load_state_dict(blob[name])
    set_rng_state(blob["rng"])
    return json.loads((folder / STATE_FILE).read_text())
