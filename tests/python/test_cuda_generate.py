"""Generation on a GPU from Python: the model moved with .cuda() decodes the same tokens with dynamic, static and
CUDA-graph decode steps as on the CPU. Needs a CUDA device: without one it is skipped, unless LCKV_REQUIRE_CUDA=1
(scripts/gpu_check.sh), which makes a missing GPU a failure so a GPU run cannot pass by skipping."""

import os

import pytest
import torch

import lckv
from conftest import tiny_config


def _cuda_or_skip():
    if torch.cuda.is_available():
        return
    if os.environ.get("LCKV_REQUIRE_CUDA") == "1":
        pytest.fail("LCKV_REQUIRE_CUDA=1 but torch sees no CUDA device")
    pytest.skip("no CUDA device")


def test_cuda_graph_decode_equals_cpu_greedy():
    _cuda_or_skip()
    torch.manual_seed(0)
    model = lckv.LCKVForCausalLM(tiny_config()).eval()
    prompts = [[5, 17, 3, 22, 9, 1], [8, 40]]
    cpu = model.generate(prompts, max_new_tokens=12, prefill="exact", return_logits=True)
    model.cuda()
    for step in ("dynamic", "static", "cuda_graph"):
        out = model.generate(prompts, max_new_tokens=12, prefill="exact", decode_step=step, return_logits=True)
        assert out.tokens == cpu.tokens, step
        assert (out.logits.cpu() - cpu.logits).abs().max().item() < 1e-4, step
