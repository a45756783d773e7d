"""Shared test setup: offline and seeded."""

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `mllm ask | caption | draw` run in their own process in tests (and in the commands tests start), never in a
# background worker that would outlive the test; tests/mllm/test_worker.py turns it on in a folder of its own.
os.environ["MLLM_WORKER"] = "0"

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
