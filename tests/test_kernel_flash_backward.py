"""The Triton flash-attention backward pass: gradients, gradcheck, determinism, torch.compile."""
import math

import pytest
import torch

from kernels import flash_attention
from kernels.flash_attention import _flash_bwd, _flash_fwd
from reference import naive_attention
from tests.cases import ATTENTION_CASES, GPU_CASES, SMALL_CASES, AttentionCase, dtype_params, params
from tests.helpers import GRADIENT_FACTOR, assert_close_to_reference, poisoned_like, rows_with_a_key


def naive_gradients(q, k, v, do, causal, sm_scale, dtype=None):
    """dq, dk, dv of the naive reference by autograd (in `dtype`, default the inputs')."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    o = naive_attention(*leaves, causal=causal, sm_scale=sm_scale)
    o.backward(do.to(o.dtype))
    return [t.grad for t in leaves]


def run_backward_poisoned(q, k, v, do, causal, sm_scale):
    """Forward, then the backward launcher writing into NaN-filled gradient buffers."""
    o, lse = _flash_fwd(q, k, v, causal, sm_scale)
    return _flash_bwd(do, q, k, v, o, lse, causal, sm_scale,
                      dq=poisoned_like(q), dk=poisoned_like(k), dv=poisoned_like(v))


def check_gradients(case, dtype, device):
    q, k, v = case.make_inputs(dtype, device)
    do = torch.randn_like(q)
    sm_scale = 1.0 / math.sqrt(case.head_dim)
    grads = run_backward_poisoned(q, k, v, do, case.causal, sm_scale)
    grads64 = naive_gradients(q, k, v, do, case.causal, sm_scale, dtype=torch.float64)
    grads_torch = naive_gradients(q, k, v, do, case.causal, sm_scale)
    for name, grad, grad64, grad_torch in zip(("dq", "dk", "dv"), grads, grads64, grads_torch):
        assert_close_to_reference(grad, grad64, grad_torch, factor=GRADIENT_FACTOR, name=name)
    # A query row that sees no key has a constant 0 output: its dq is exactly 0.
    blind = slice(0, rows_with_a_key(case.n_q, case.n_k, case.causal).start)
    assert torch.all(grads[0][:, :, blind] == 0)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", params(ATTENTION_CASES))
def test_gradients_match_references(case, dtype, device):
    check_gradients(case, dtype, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", params(GPU_CASES))
def test_gradients_long_sequences_gpu(case, dtype, device):
    check_gradients(case, dtype, device)


@pytest.mark.parametrize("case", params(SMALL_CASES))
def test_autograd_matches_launcher(case, device):
    """flash_attention(...).backward goes through the custom op into the same kernels."""
    q, k, v = case.make_inputs(torch.float32, device, requires_grad=True)
    do = torch.randn_like(q)
    flash_attention(q, k, v, causal=case.causal).backward(do)
    sm_scale = 1.0 / math.sqrt(case.head_dim)
    expected = run_backward_poisoned(q.detach(), k.detach(), v.detach(), do, case.causal, sm_scale)
    for leaf, grad in zip((q, k, v), expected):
        assert torch.equal(leaf.grad, grad)


GRADCHECK_CASES = [
    AttentionCase(batch=1, h_q=2, h_kv=2, n_q=5, n_k=5, head_dim=4, causal=True),
    AttentionCase(batch=1, h_q=4, h_kv=2, n_q=3, n_k=6, head_dim=5, causal=True),  # gqa, Nq < Nk
    AttentionCase(batch=2, h_q=2, h_kv=1, n_q=6, n_k=3, head_dim=3, causal=True),  # mqa, rows with no key
    AttentionCase(batch=1, h_q=2, h_kv=1, n_q=4, n_k=7, head_dim=6, causal=False),
]


def outputs_with_lse(causal):
    def outputs(q, k, v):
        o, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
        return o, lse.masked_fill(torch.isinf(lse), 0.0)  # -inf rows are constant; keep them finite
    return outputs


@pytest.mark.parametrize("case", params(GRADCHECK_CASES))
def test_gradcheck_float64(case, device):
    """Finite differences in float64 agree with the kernels' analytic gradients, lse included.

    fast_mode compares the Jacobians along random directions instead of
    element by element: one interpreted kernel run per direction, not per input.
    """
    inputs = case.make_inputs(torch.float64, device, requires_grad=True)
    assert torch.autograd.gradcheck(outputs_with_lse(case.causal), inputs, fast_mode=True)


def test_gradcheck_float64_full_jacobian(device):
    """The slow, element-by-element gradcheck, on the smallest case with a blind row and GQA."""
    case = AttentionCase(batch=1, h_q=2, h_kv=1, n_q=3, n_k=2, head_dim=2, causal=True)
    inputs = case.make_inputs(torch.float64, device, requires_grad=True)
    assert torch.autograd.gradcheck(outputs_with_lse(case.causal), inputs)


def test_gqa_gradients_are_deterministic(device):
    """dK/dV of a kv head are summed over its query heads in a fixed order, without atomics."""
    case = AttentionCase(batch=1, h_q=8, h_kv=2, n_q=130, n_k=130, head_dim=32, causal=True)
    q, k, v = case.make_inputs(torch.bfloat16, device)
    do = torch.randn_like(q)
    first = run_backward_poisoned(q, k, v, do, True, 0.2)
    second = run_backward_poisoned(q, k, v, do, True, 0.2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


BACKWARD_PATHS = [
    # The GQA group split across programs into fp32 partial sums (what a GPU does when the grid is small).
    pytest.param(dict(gqa_splits=2), id="group-split-2"),
    pytest.param(dict(gqa_splits=4), id="group-split-4"),
    # FlashAttention-2's fused backward: dQ added with atomics inside the dK/dV kernel.
    pytest.param(dict(deterministic=False), id="fused-atomic-dq"),
    pytest.param(dict(deterministic=False, gqa_splits=4), id="fused-and-split"),
]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="float32"), pytest.param(torch.bfloat16,
                                                                                           id="bfloat16")])
@pytest.mark.parametrize("path", BACKWARD_PATHS)
def test_split_and_fused_backward_paths(path, dtype, device):
    """Every way of running the backward meets the tolerance rule, on GQA 8:2 with Nq > Nk (rows with no key)."""
    case = AttentionCase(batch=1, h_q=8, h_kv=2, n_q=97, n_k=70, head_dim=40, causal=True)
    q, k, v = case.make_inputs(dtype, device)
    do = torch.randn_like(q)
    o, lse = _flash_fwd(q, k, v, True, 0.2)
    grads = _flash_bwd(do, q, k, v, o, lse, True, 0.2, dq=poisoned_like(q), dk=poisoned_like(k),
                       dv=poisoned_like(v), **path)
    grads64 = naive_gradients(q, k, v, do, True, 0.2, dtype=torch.float64)
    grads_torch = naive_gradients(q, k, v, do, True, 0.2)
    for name, grad, grad64, grad_torch in zip(("dq", "dk", "dv"), grads, grads64, grads_torch):
        assert_close_to_reference(grad, grad64, grad_torch, factor=GRADIENT_FACTOR, name=name)
    if path.get("deterministic", True):  # partial sums are added in a fixed order: the same bits every run
        again = _flash_bwd(do, q, k, v, o, lse, True, 0.2, **path)
        assert all(torch.equal(a, b) for a, b in zip(grads, again))


def test_split_count_must_divide_the_group(device):
    q, k, v = AttentionCase(batch=1, h_q=6, h_kv=2, n_q=8, n_k=8, head_dim=16, causal=False).make_inputs(
        torch.float32, device)
    o, lse = _flash_fwd(q, k, v, False, 0.25)
    with pytest.raises(ValueError, match=r"gqa_splits \(2\) must divide the query heads per kv head \(3\)"):
        _flash_bwd(torch.randn_like(q), q, k, v, o, lse, False, 0.25, gqa_splits=2)


def test_public_api_non_deterministic_backward(device):
    """flash_attention(deterministic=False) reaches the fused kernel through the custom op."""
    q, k, v = AttentionCase(batch=1, h_q=4, h_kv=2, n_q=33, n_k=33, head_dim=16, causal=True).make_inputs(
        torch.float32, device, requires_grad=True)
    do = torch.randn_like(q)
    flash_attention(q, k, v, causal=True, deterministic=False).backward(do)
    o, lse = _flash_fwd(q.detach(), k.detach(), v.detach(), True, 0.25)
    expected = _flash_bwd(do, q.detach(), k.detach(), v.detach(), o, lse, True, 0.25, deterministic=False)
    for leaf, grad in zip((q, k, v), expected):
        torch.testing.assert_close(leaf.grad, grad, rtol=0, atol=1e-6)  # atomics: same sums, any order


class TinyAttentionModel(torch.nn.Module):
    """A projection, flash attention and an output projection: enough to trace end to end."""

    def __init__(self, d_model=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d_model // heads
        self.q_proj = torch.nn.Linear(d_model, d_model, bias=False)
        self.kv_proj = torch.nn.Linear(d_model, 2 * kv_heads * self.head_dim, bias=False)
        self.o_proj = torch.nn.Linear(d_model, d_model, bias=False)

    def forward(self, x):
        b, n, _ = x.shape
        # (b, n, d_model) -> (b, heads, n, head_dim)
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        # (b, n, 2 * kv_heads * head_dim) -> 2 x (b, kv_heads, n, head_dim)
        k, v = self.kv_proj(x).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = flash_attention(q, k, v, causal=True)
        # (b, heads, n, head_dim) -> (b, n, d_model)
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1))


def test_compiles_without_graph_breaks(device):
    """fullgraph=True fails on any graph break; the custom op's fake impl makes it traceable."""
    torch._dynamo.reset()
    model = TinyAttentionModel().to(device)
    x = torch.randn(2, 19, 32, device=device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(x)
    eager.sum().backward()
    torch.testing.assert_close(out, eager)
    for compiled_grad, p in zip(compiled_grads, model.parameters()):
        torch.testing.assert_close(compiled_grad, p.grad)
