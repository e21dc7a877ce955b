"""The Triton flash-attention forward pass against float64, the naive reference and SDPA."""
import math

import pytest
import torch

from kernels import flash_attention
from kernels.flash_attention import _flash_fwd, check_flash_inputs
from reference import naive_attention, tiled_flash_attention
from tests.cases import ATTENTION_CASES, GPU_CASES, SMALL_CASES, dtype_params, params
from tests.helpers import (assert_close_to_reference, attention_lse, poisoned_like, rows_with_a_key,
                           sdpa_attention)


def run_forward_poisoned(q, k, v, causal, sm_scale):
    """The launcher, writing into NaN-filled buffers, so an unwritten element fails the test."""
    check_flash_inputs(q, k, v, sm_scale)
    o = poisoned_like(q)
    lse = poisoned_like(q, shape=q.shape[:3], dtype=torch.float32)
    return _flash_fwd(q, k, v, causal, sm_scale, o=o, lse=lse)


def check_forward(case, dtype, device):
    q, k, v = case.make_inputs(dtype, device)
    sm_scale = 1.0 / math.sqrt(case.head_dim)
    o, lse = run_forward_poisoned(q, k, v, case.causal, sm_scale)

    o64 = naive_attention(q, k, v, case.causal, sm_scale, dtype=torch.float64)
    assert_close_to_reference(o, o64, naive_attention(q, k, v, case.causal, sm_scale), name="o vs naive")
    rows = rows_with_a_key(case.n_q, case.n_k, case.causal)
    sdpa = sdpa_attention(q, k, v, case.causal, sm_scale)
    assert_close_to_reference(o[:, :, rows], o64[:, :, rows], sdpa[:, :, rows], name="o vs SDPA")

    lse64 = attention_lse(q, k, v, case.causal, sm_scale, torch.float64)
    lse32 = attention_lse(q, k, v, case.causal, sm_scale, torch.float32)
    assert_close_to_reference(lse[:, :, rows], lse64[:, :, rows], lse32[:, :, rows], name="lse")
    # Rows that see no key: output exactly 0, lse exactly -inf, never NaN.
    blind = slice(0, rows.start)
    assert torch.all(o[:, :, blind] == 0), "a row with no visible key must output 0"
    assert torch.all(lse[:, :, blind] == float("-inf")), "a row with no visible key must have lse = -inf"


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", params(ATTENTION_CASES))
def test_forward_matches_references(case, dtype, device):
    check_forward(case, dtype, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", params(GPU_CASES))
def test_forward_long_sequences_gpu(case, dtype, device):
    check_forward(case, dtype, device)


@pytest.mark.parametrize("case", params(SMALL_CASES))
def test_public_api_matches_launcher_and_tiled_reference(case, device):
    q, k, v = case.make_inputs(torch.float32, device)
    o, lse = flash_attention(q, k, v, causal=case.causal, return_lse=True)
    o_launcher, lse_launcher = run_forward_poisoned(q, k, v, case.causal, 1.0 / math.sqrt(case.head_dim))
    assert torch.equal(o, o_launcher) and torch.equal(lse, lse_launcher)
    assert torch.equal(flash_attention(q, k, v, causal=case.causal), o), "return_lse=False must return o alone"
    # The kernel mirrors reference/tiled.py; with the same blocks both sum in the same order.
    o_tiled, lse_tiled = tiled_flash_attention(q, k, v, case.causal, block_m=64, block_n=32, return_lse=True)
    torch.testing.assert_close(o, o_tiled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_tiled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_custom_sm_scale(causal, device):
    q, k, v = SMALL_CASES[0].make_inputs(torch.float32, device)
    o = flash_attention(q, k, v, causal=causal, sm_scale=0.3)
    o64 = naive_attention(q, k, v, causal, sm_scale=0.3, dtype=torch.float64)
    assert_close_to_reference(o, o64, naive_attention(q, k, v, causal, sm_scale=0.3))


@pytest.mark.parametrize("dtype", dtype_params())
def test_strided_views_of_a_fused_projection(dtype, device):
    """q, k, v sliced from one (B, N, 3, H, D) projection: no copy, strides only."""
    batch, n, heads, head_dim = 2, 70, 3, 24
    qkv = torch.randn(batch, n, 3, heads, head_dim, dtype=dtype, device=device)
    # (B, N, 3, H, D) -> three (B, H, N, D) views with strides (N*3*H*D, D, 3*H*D, 1)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    o, _ = run_forward_poisoned(q, k, v, True, 1.0 / math.sqrt(head_dim))
    o64 = naive_attention(q, k, v, True, dtype=torch.float64)
    assert_close_to_reference(o, o64, naive_attention(q, k, v, True))


def test_empty_query_returns_empty(device):
    q = torch.randn(1, 2, 0, 16, device=device)
    k = v = torch.randn(1, 2, 5, 16, device=device)
    assert flash_attention(q, k, v).shape == (1, 2, 0, 16)
