"""Shared fixtures. Tiny random models live in tests/tiny.py; here, the environment and the real model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Once for the whole session (one S3 server, one Ray): the fixtures of a real local Ray, a real S3 server and a tiny
# target model on disk (tests/raytest.py).
from tests.raytest import ray_local, s3_server, tiny_target  # noqa: E402, F401  (fixtures)


@pytest.fixture(scope="session")
def smollm2_ngram():
    """The real offline model, SmolLM2-135M-Instruct, with the n-gram drafter."""
    from cmsd import load_pair

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return load_pair("smollm2", "ngram", device="cpu", dtype="float32")


@pytest.fixture(scope="session", autouse=True)
def modelled_costs():
    """cmsd.kernels times its one-time cost measurements with modelled costs, not the wall clock: what a test
    asserts never follows timing noise (tests/tiny.py: ModelledCosts; the automatic verify budget is 4 tokens, the
    linear layers keep torch's product). tests/cmsd/test_kernels.py tests the wall clock's own path."""
    from tests.tiny import ModelledCosts, timed_by

    with timed_by(ModelledCosts()):
        yield
