import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CONFORMANCE = ROOT / "tests" / "data" / "conformance"

# The test models are tiny: a second thread buys nothing, and on a busy machine OpenMP threads
# that wait for each other make them many times slower.
torch.set_num_threads(int(os.environ.get("LCKV_TEST_THREADS", "1")))


def tiny_config(**overrides):
    """A small random-weight model config (dict) for fast tests."""
    c = {
        "vocab_size": 61,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "layer_types": "0_4_4_4_4_5",
        "forward_passes": 3,
        "backward_passes": 2,
    }
    c.update(overrides)
    return c


@pytest.fixture
def root():
    return ROOT
