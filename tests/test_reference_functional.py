"""The functional references agree with each other and with PyTorch's SDPA.

naive_attention (full score matrix), tiled_flash_attention (online softmax,
tile by tile) and F.scaled_dot_product_attention are three independent ways to
compute the same thing; in float64 they must agree to rounding. Then the
three softmax forms, and naive_attention's input errors.
"""
import pytest
import torch

from reference import (
    naive_attention,
    naive_softmax,
    online_softmax,
    safe_softmax,
    tiled_flash_attention,
    tiled_flash_attention_backward,
)
from tests.cases import ATTENTION_CASES, AttentionCase, params
from tests.helpers import assert_close, assert_close_to_reference, attention_lse, rows_with_a_key, sdpa_attention

F64 = torch.float64
# (block_m, block_n): the kernel's default, and small unequal tiles so that
# every case spans several query and key blocks (multi-block paths).
BLOCKS = [pytest.param(64, 64, id="blocks64x64"), pytest.param(16, 32, id="blocks16x32")]


@pytest.mark.parametrize("case", params(ATTENTION_CASES))
def test_naive_matches_sdpa(case, device):
    q, k, v = case.make_inputs(F64, device)
    out = naive_attention(q, k, v, causal=case.causal)
    expected = sdpa_attention(q, k, v, case.causal, sm_scale=None)
    # A query row with no visible key has no softmax: SDPA returns NaN there in
    # some versions and backends, 0 in others. naive_attention defines it as 0.
    # Compare SDPA on the rows that see a key; hold the others to 0.
    rows = rows_with_a_key(case.n_q, case.n_k, case.causal)
    assert_close(out[:, :, rows], expected[:, :, rows], "naive_attention vs SDPA on rows with a visible key")
    blind = out[:, :, :rows.start]
    assert torch.equal(blind, torch.zeros_like(blind)), "rows with no visible key must be exactly 0"


@pytest.mark.parametrize("block_m, block_n", BLOCKS)
@pytest.mark.parametrize("case", params(ATTENTION_CASES))
def test_tiled_matches_naive(case, block_m, block_n, device):
    q, k, v = case.make_inputs(F64, device)
    out = tiled_flash_attention(q, k, v, causal=case.causal, block_m=block_m, block_n=block_n)
    assert_close(out, naive_attention(q, k, v, causal=case.causal), "tiled_flash_attention vs naive_attention")


@pytest.mark.parametrize("case", params(ATTENTION_CASES))
def test_tiled_lse_is_logsumexp_of_scores(case, device):
    q, k, v = case.make_inputs(F64, device)
    _, lse = tiled_flash_attention(q, k, v, causal=case.causal, block_m=16, block_n=32, return_lse=True)
    expected = attention_lse(q, k, v, case.causal, q.shape[-1] ** -0.5, F64)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(lse), finite), "lse must be -inf exactly on the rows with no visible key"
    assert (lse[~finite] == float("-inf")).all(), f"non-finite lse values other than -inf: {lse[~finite]}"
    assert_close(lse[finite], expected[finite], "tiled lse vs logsumexp of the naive scores")


@pytest.mark.parametrize("case", params(ATTENTION_CASES))
def test_tiled_float32_obeys_tolerance_rule(case, device):
    # In float32 the tiled form rounds differently from the full-matrix one;
    # it may be at most 2x as far from float64 as PyTorch's own float32 is.
    q, k, v = case.make_inputs(torch.float32, device)
    reference64 = naive_attention(q, k, v, causal=case.causal, dtype=F64)
    torch32 = naive_attention(q, k, v, causal=case.causal)
    out = tiled_flash_attention(q, k, v, causal=case.causal, block_m=16, block_n=32)
    assert out.dtype == torch.float32, f"output dtype {out.dtype}, expected the input's float32"
    assert_close_to_reference(out, reference64, torch32, name="tiled_flash_attention float32")


# --- softmax -----------------------------------------------------------------

ROW = 37
# 1 is the element-by-element recurrence, 5 leaves a partial last block, 64 is longer than the row (one block).
ONLINE_BLOCKS = [1, 5, 64]
SOFTMAXES = [pytest.param(naive_softmax, id="naive"), pytest.param(safe_softmax, id="safe")] + [
    pytest.param(lambda x, b=b: online_softmax(x, block_size=b), id=f"online-block{b}") for b in ONLINE_BLOCKS
]
STABLE_SOFTMAXES = SOFTMAXES[1:]


@pytest.mark.parametrize("softmax", SOFTMAXES)
def test_softmax_forms_match_torch_on_moderate_logits(softmax):
    x = 3.0 * torch.randn(4, 3, ROW, dtype=F64)
    assert_close(softmax(x), torch.softmax(x, dim=-1), "softmax vs torch.softmax")


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("softmax", STABLE_SOFTMAXES)
def test_stable_softmax_survives_huge_logits(softmax, dtype):
    x = (2 * torch.rand(4, ROW, dtype=dtype) - 1) * 1e4  # logits in (-1e4, 1e4)
    out = softmax(x)
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} non-finite outputs"
    tol = 2 * torch.finfo(dtype).eps
    assert_close(out, torch.softmax(x, dim=-1), "softmax vs torch.softmax on logits of +-1e4", atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_naive_softmax_overflows_on_huge_logits(dtype):
    # Why the max matters: exp(1e4) is inf in float32 (limit ~88.7) and float64
    # (limit ~709.8), so the naive form divides inf by inf and returns NaN;
    # subtracting the row max makes every exponent <= 0 and cannot overflow.
    x = (2 * torch.rand(4, ROW, dtype=dtype) - 1) * 1e4
    assert not torch.isfinite(naive_softmax(x)).all(), "naive softmax unexpectedly stayed finite on logits of +-1e4"


def test_online_softmax_rejects_empty_blocks():
    with pytest.raises(ValueError, match="block_size"):
        online_softmax(torch.randn(3, 5), block_size=0)


# --- input errors ------------------------------------------------------------

def _good():
    return AttentionCase(batch=2, h_q=4, h_kv=2, n_q=5, n_k=6, head_dim=24, causal=False).make_inputs(F64, "cpu")


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        pytest.param(lambda q, k, v: (q.tolist(), k, v), TypeError, "q must be a torch.Tensor", id="not-a-tensor"),
        pytest.param(lambda q, k, v: (q[0], k, v), ValueError, "q must have rank 4", id="rank-q"),
        pytest.param(lambda q, k, v: (q, k[0], v), ValueError, "k must have rank 4", id="rank-k"),
        pytest.param(lambda q, k, v: (q[:1], k, v), ValueError, "batch size", id="batch"),
        pytest.param(lambda q, k, v: (q[..., :8], k, v), ValueError, "head_dim", id="head-dim"),
        pytest.param(lambda q, k, v: (q[:, :3], k, v), ValueError, "multiple of the number of kv heads", id="hq%hkv"),
        pytest.param(lambda q, k, v: (q, k, v[:, :, :4]), ValueError, "k and v must have the same shape", id="k-vs-v"),
    ],
)
def test_naive_attention_input_errors(mutate, error, match):
    q, k, v = mutate(*_good())
    with pytest.raises(error, match=match):
        naive_attention(q, k, v)


@pytest.mark.parametrize("block_m, block_n", BLOCKS)
@pytest.mark.parametrize("case", params(ATTENTION_CASES))
def test_tiled_backward_matches_autograd(case, block_m, block_n, device):
    """The backward blueprint gives autograd's gradients of naive attention."""
    q, k, v = case.make_inputs(F64, device, requires_grad=True)
    do = torch.randn_like(q)
    naive_attention(q, k, v, causal=case.causal).backward(do)
    o, lse = tiled_flash_attention(q.detach(), k.detach(), v.detach(), case.causal, return_lse=True)
    grads = tiled_flash_attention_backward(q.detach(), k.detach(), v.detach(), o, lse, do, causal=case.causal,
                                           block_m=block_m, block_n=block_n)
    for name, grad, leaf in zip(("dq", "dk", "dv"), grads, (q, k, v)):
        assert_close(grad, leaf.grad, f"tiled backward {name} vs autograd")
