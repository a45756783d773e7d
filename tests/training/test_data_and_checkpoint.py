import random

import numpy as np
import pytest
import torch

from training.checkpoint import latest_checkpoint, load_training_state, save_checkpoint
from training.data import EpochSampler


def test_epoch_sampler_covers_each_epoch_once_and_resumes_exactly():
    sampler = EpochSampler(10, batch_size=3, seed=5)
    first_epoch = np.concatenate([sampler.next_indices() for _ in range(3)])
    assert len(set(first_epoch.tolist())) == 9  # 3 full batches, the ragged tail is dropped
    state = sampler.state()
    expected = [sampler.next_indices().tolist() for _ in range(5)]
    resumed = EpochSampler(10, batch_size=3, seed=5)
    resumed.load_state(state)
    assert [resumed.next_indices().tolist() for _ in range(5)] == expected


def test_epoch_sampler_ranks_split_each_global_batch():
    ranks = [EpochSampler(20, batch_size=4, seed=1, rank=r, world_size=2) for r in range(2)]
    single = EpochSampler(20, batch_size=8, seed=1)
    for _ in range(4):
        joined = np.concatenate([r.next_indices() for r in ranks])
        assert joined.tolist() == single.next_indices().tolist()


def test_epoch_sampler_refuses_too_little_data():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochSampler(3, batch_size=4, seed=0)


def test_checkpoint_restores_optimizer_scheduler_and_rng(tmp_path):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()

    def save_model(folder):
        folder.mkdir()
        (folder / "weights.txt").write_text("x")

    save_checkpoint(tmp_path / "step-1", save_model, {"optimizer": optimizer, "scheduler": scheduler}, {"step": 1})
    save_checkpoint(tmp_path / "step-2", save_model, {"optimizer": optimizer, "scheduler": scheduler}, {"step": 2})
    save_checkpoint(tmp_path / "step-3", save_model, {"optimizer": optimizer, "scheduler": scheduler}, {"step": 3},
                    keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-3"]
    expected = (torch.rand(3), np.random.rand(2), random.random())

    # Disturb every generator, then restore.
    torch.rand(5), np.random.rand(5), random.random()
    fresh = torch.optim.AdamW(torch.nn.Linear(4, 2).parameters(), lr=0.1)
    fresh_scheduler = torch.optim.lr_scheduler.StepLR(fresh, step_size=1, gamma=0.5)
    state = load_training_state(latest_checkpoint(tmp_path), {"optimizer": fresh, "scheduler": fresh_scheduler})
    assert state == {"step": 3}
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    # RNG states were captured at save time, before `expected` was drawn.
    again = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(again[0], expected[0]) and np.array_equal(again[1], expected[1]) and again[2] == expected[2]
