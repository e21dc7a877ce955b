"""The kernels' variants: sliding window, softcap, ALiBi, sinks, dropout and packed varlen sequences.

Every variant is held to `reference.naive_attention` with the same option, in
float64, under the tolerance rule, forward and backward (d sinks included).
"""
import math

import pytest
import torch

from kernels import flash_attention, flash_attention_varlen
from kernels.flash_attention import _flash_bwd, _flash_fwd, dropout_keep_mask
from reference import naive_attention, naive_attention_varlen
from tests.cases import VARIANT_CASES, AttentionCase, dtype_params
from tests.helpers import GRADIENT_FACTOR, assert_close_to_reference, poisoned_like

CAUSAL = [pytest.param(False, id="full"), pytest.param(True, id="causal")]


def reference_with_grads(q, k, v, do, causal, options, dtype, varlen=None):
    """Output, lse and gradients (q, k, v and sinks if present) of the naive reference in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    options = dict(options)
    if "sinks" in options:
        options["sinks"] = options["sinks"].detach().to(dtype).requires_grad_()
        leaves.append(options["sinks"])
    if varlen is None:
        o, lse = naive_attention(*leaves[:3], causal, None, dtype, return_lse=True, **options)
    else:
        o, lse = naive_attention_varlen(*leaves[:3], *varlen, causal, None, dtype, **options), None
    o.backward(do.to(dtype))
    return o, lse, [t.grad for t in leaves]


def check_variant(case, causal, dtype, device):
    s = case.shape
    q, k, v = AttentionCase(s.batch, s.h_q, s.h_kv, s.n_q, s.n_k, s.head_dim, causal).make_inputs(dtype, device)
    options = case.options(device)
    do = torch.randn_like(q)
    sm_scale = 1.0 / math.sqrt(s.head_dim)
    o, lse = _flash_fwd(q, k, v, causal, sm_scale, o=poisoned_like(q), lse=poisoned_like(q, q.shape[:3], torch.float32),
                        **options)
    dsinks = poisoned_like(q, (s.h_q,), torch.float32) if case.sinks else None
    grads = _flash_bwd(do, q, k, v, o, lse, causal, sm_scale, dq=poisoned_like(q), dk=poisoned_like(k),
                       dv=poisoned_like(v), dsinks=dsinks, **options)
    grads = list(grads) + ([dsinks] if case.sinks else [])

    o64, lse64, grads64 = reference_with_grads(q, k, v, do, causal, options, torch.float64)
    o_torch, lse32, grads_torch = reference_with_grads(q, k, v, do, causal, options, dtype)
    assert_close_to_reference(o, o64, o_torch, name="o")
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite), "lse must be -inf exactly where no key (and no sink) is seen"
    _, lse_fp32, _ = reference_with_grads(q, k, v, do, causal, options, torch.float32)
    assert_close_to_reference(lse[finite], lse64[finite], lse_fp32[finite], name="lse")
    for name, grad, grad64, grad_torch in zip(("dq", "dk", "dv", "dsinks"), grads, grads64, grads_torch):
        assert_close_to_reference(grad, grad64, grad_torch, factor=GRADIENT_FACTOR, name=name)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in VARIANT_CASES])
def test_variant_matches_reference(case, causal, dtype, device):
    check_variant(case, causal, dtype, device)


def test_window_skips_blocks_outside_the_band(device):
    """Keys outside every row's window are never read: NaN there cannot reach the output."""
    q, k, v = AttentionCase(1, 2, 2, 256, 256, 16, True).make_inputs(torch.float32, device)
    k_poisoned, v_poisoned = k.clone(), v.clone()
    k_poisoned[:, :, :96], v_poisoned[:, :, :96] = float("nan"), float("nan")
    # 64 queries aligned bottom-right on 256 keys, with a left window of 64, see keys from 128 on only.
    q = q[:, :, 192:]
    o = flash_attention(q, k_poisoned, v_poisoned, causal=True, window_size=(64, 0))
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, naive_attention(q, k, v, True, window_size=(64, 0)), atol=1e-5, rtol=1e-5)


def test_window_of_none_is_plain_attention_bitwise(device):
    q, k, v = AttentionCase(1, 4, 2, 97, 70, 32, True).make_inputs(torch.float32, device)
    for causal in (False, True):
        assert torch.equal(flash_attention(q, k, v, causal=causal, window_size=(None, -1)),
                           flash_attention(q, k, v, causal=causal))


# ----------------------------------------------------------------------------
# Packed sequences
# ----------------------------------------------------------------------------
def packed(lengths_q, lengths_k, h_q, h_kv, head_dim, dtype, device):
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(sum(lengths_q), h_q, head_dim, dtype=dtype, device=device)
    k = torch.randn(sum(lengths_k), h_kv, head_dim, dtype=dtype, device=device)
    return q, k, torch.randn_like(k), cu_q, cu_k


VARLEN_CASES = [
    # Lengths 0, 1 and 257 in one batch: an empty sequence, a single token, several blocks and a 1-row tail.
    pytest.param(dict(lengths_q=[40, 0, 1, 257], lengths_k=[40, 0, 1, 257], h_q=2, h_kv=1, head_dim=32, causal=True),
                 id="lengths-0-1-257-causal"),
    # Nq != Nk per sequence (bottom-right causal within each), including a sequence with keys but no query.
    pytest.param(dict(lengths_q=[7, 70, 0], lengths_k=[30, 33, 5], h_q=4, h_kv=2, head_dim=40, causal=True),
                 id="ragged-q-k-causal"),
    pytest.param(dict(lengths_q=[7, 70, 0], lengths_k=[30, 33, 5], h_q=4, h_kv=2, head_dim=40, causal=False),
                 id="ragged-q-k-full"),
    # The combinations the issue names: window + softcap + GQA, and ALiBi (per sequence) + causal.
    pytest.param(dict(lengths_q=[50, 90], lengths_k=[50, 90], h_q=4, h_kv=2, head_dim=16, causal=False,
                      options=dict(window_size=(12, 12), softcap=3.0)), id="window-softcap-gqa"),
    pytest.param(dict(lengths_q=[33, 64, 9], lengths_k=[33, 64, 9], h_q=2, h_kv=2, head_dim=16, causal=True,
                      options=dict(alibi_slopes="batch")), id="alibi-causal"),
]


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("spec", VARLEN_CASES)
def test_varlen_matches_each_sequence_alone(spec, dtype, device):
    spec = dict(spec)
    options = dict(spec.pop("options", {}))
    causal = spec.pop("causal")
    q, k, v, cu_q, cu_k = packed(**spec, dtype=dtype, device=device)
    if options.get("alibi_slopes") == "batch":
        options["alibi_slopes"] = torch.rand(len(spec["lengths_q"]), spec["h_q"], device=device) * 0.5
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    max_q, max_k = max(spec["lengths_q"]), max(spec["lengths_k"])
    o = flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, **options)
    do = torch.randn_like(o)
    o.backward(do)
    grads = [t.grad for t in (q, k, v)]

    varlen = (cu_q.tolist(), cu_k.tolist())
    o64, _, grads64 = reference_with_grads(q, k, v, do, causal, options, torch.float64, varlen)
    o_torch, _, grads_torch = reference_with_grads(q, k, v, do, causal, options, dtype, varlen)
    assert_close_to_reference(o, o64, o_torch, name="o")
    for name, grad, grad64, grad_torch in zip(("dq", "dk", "dv"), grads, grads64, grads_torch):
        assert_close_to_reference(grad, grad64, grad_torch, factor=GRADIENT_FACTOR, name=name)

    # Each sequence alone through the padded kernel gives the same bits: same tiles, same order.
    for b in range(len(spec["lengths_q"])):
        rows_q, rows_k = slice(varlen[0][b], varlen[0][b + 1]), slice(varlen[1][b], varlen[1][b + 1])
        alone_options = dict(options)
        if "alibi_slopes" in options:
            alone_options["alibi_slopes"] = options["alibi_slopes"][b]
        # (N_b, H, D) -> (1, H, N_b, D)
        q_b, k_b, v_b = (t.detach()[rows].transpose(0, 1)[None] for t, rows in ((q, rows_q), (k, rows_k),
                                                                                (v, rows_k)))
        alone = flash_attention(q_b, k_b, v_b, causal=causal, **alone_options)
        assert torch.equal(o.detach()[rows_q], alone[0].transpose(0, 1)), f"sequence {b} differs from itself alone"


def test_varlen_lse_layout_and_empty_batch(device):
    q, k, v, cu_q, cu_k = packed([5, 0, 9], [5, 3, 9], 2, 1, 16, torch.float32, device)
    o, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, 9, 9, causal=True, return_lse=True)
    assert lse.shape == (2, 14)
    # The last sequence owns q rows 5:14 and k, v rows 8:17; the empty one outputs nothing.
    o_b, lse_b = flash_attention(q[5:].transpose(0, 1)[None], *(t[8:].transpose(0, 1)[None] for t in (k, v)),
                                 causal=True, return_lse=True)
    assert torch.equal(lse[:, 5:], lse_b[0])
    assert torch.equal(o[5:], o_b[0].transpose(0, 1))


# ----------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------
def kernel_mask(seed_state, p, batch, h_q, n_q, n_k, device):
    """The mask the kernels draw after torch.manual_seed(seed_state), through the test helper."""
    torch.manual_seed(seed_state)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    return dropout_keep_mask(seed, p, batch * h_q, n_q, n_k).reshape(batch, h_q, n_q, n_k)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="float32"), pytest.param(torch.bfloat16,
                                                                                           id="bfloat16")])
def test_dropout_equals_reference_with_the_kernels_mask(dtype, device):
    p = 0.25
    q, k, v = AttentionCase(2, 4, 2, 97, 70, 32, True).make_inputs(dtype, device, requires_grad=True)
    torch.manual_seed(7)
    o = flash_attention(q, k, v, causal=True, dropout_p=p)
    do = torch.randn_like(o)
    o.backward(do)
    mask = kernel_mask(7, p, 2, 4, 97, 70, device)
    options = dict(dropout_mask=mask, dropout_p=p)
    o64, _, grads64 = reference_with_grads(q, k, v, do, True, options, torch.float64)
    o_torch, _, grads_torch = reference_with_grads(q, k, v, do, True, options, dtype)
    assert_close_to_reference(o, o64, o_torch, name="o")
    for name, leaf, grad64, grad_torch in zip(("dq", "dk", "dv"), (q, k, v), grads64, grads_torch):
        assert_close_to_reference(leaf.grad, grad64, grad_torch, factor=GRADIENT_FACTOR, name=name)


def test_dropout_same_seed_same_bits(device):
    q, k, v = AttentionCase(1, 2, 1, 70, 70, 16, False).make_inputs(torch.float32, device, requires_grad=True)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        o = flash_attention(q, k, v, dropout_p=0.5)
        o.sum().backward()
        runs.append([o.detach().clone()] + [t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    torch.manual_seed(4)
    assert not torch.equal(flash_attention(q, k, v, dropout_p=0.5), runs[0][0]), "another seed, another mask"


def test_dropout_keeps_one_minus_p(device):
    p = 0.3
    mask = kernel_mask(11, p, 4, 8, 128, 128, device)
    kept, n = mask.float().mean().item(), mask.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma, f"kept {kept:.4f}, expected {1 - p} +- {5 * sigma:.4f}"


def test_dropout_varlen_uses_packed_rows(device):
    """Packed sequence b draws its mask from rows cu_seqlens_q[b]... of stream = head."""
    p = 0.5
    q, k, v, cu_q, cu_k = packed([20, 37], [20, 37], 2, 1, 16, torch.float32, device)
    torch.manual_seed(5)
    o = flash_attention_varlen(q, k, v, cu_q, cu_k, 37, 37, causal=True, dropout_p=p)
    torch.manual_seed(5)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    masks = [dropout_keep_mask(seed, p, 2, n, n, row_offset=start)[None] for start, n in ((0, 20), (20, 37))]
    expected = naive_attention_varlen(q, k, v, cu_q.tolist(), cu_k.tolist(), True, None, torch.float64,
                                      dropout_mask=masks, dropout_p=p)
    assert_close_to_reference(o, expected, naive_attention_varlen(q, k, v, cu_q.tolist(), cu_k.tolist(), True,
                                                                  dropout_mask=masks, dropout_p=p))


# ----------------------------------------------------------------------------
# GPU fidelity on the CPU, large offsets, and the compile path
# ----------------------------------------------------------------------------
def test_bf16_stores_round_to_nearest_like_a_gpu(device):
    """The bf16 kernel's O and gradients are the fp32 kernel's on the same values, rounded to nearest even."""
    if device != "cpu":
        pytest.skip("on a GPU, bf16 products run on tensor cores and differ from fp32 before rounding")
    q, k, v = AttentionCase(1, 4, 2, 97, 70, 40, True).make_inputs(torch.bfloat16, device)
    do = torch.randn_like(q)
    o, lse = _flash_fwd(q, k, v, True, 0.2)
    o32, lse32 = _flash_fwd(q.float(), k.float(), v.float(), True, 0.2)
    assert torch.equal(o, o32.to(torch.bfloat16))
    grads = _flash_bwd(do, q, k, v, o, lse, True, 0.2)
    grads32 = _flash_bwd(do.float(), q.float(), k.float(), v.float(), o.float(), lse32, True, 0.2)
    for grad, grad32 in zip(grads, grads32):
        assert torch.equal(grad, grad32.to(torch.bfloat16))


def test_offsets_past_2_31_elements(device):
    """Key rows 2**20 elements apart: a block start times the stride passes 2**31 within one (batch, head)."""
    stride, n_k, head_dim = 2**20, 2304, 16
    try:  # a sparse view: only the rows written are ever touched in memory
        storage = torch.empty(stride * n_k, dtype=torch.float16, device=device)
    except RuntimeError as error:
        pytest.skip(f"cannot reserve {stride * n_k * 2 / 2**30:.1f} GiB of address space: {error}")
    k = storage.as_strided((1, 1, n_k, head_dim), (0, 0, stride, 1))
    k.copy_(torch.randn(1, 1, n_k, head_dim))
    q = torch.randn(1, 1, 4, head_dim, dtype=torch.float16, device=device)
    v = k  # the same far-apart rows serve as values
    o = flash_attention(q, k, v)
    k_dense = k.contiguous()
    assert_close_to_reference(o, naive_attention(q, k_dense, k_dense, dtype=torch.float64),
                              naive_attention(q, k_dense, k_dense))


def test_custom_op_compiles_with_options(device):
    q, k, v = AttentionCase(1, 4, 2, 33, 33, 16, True).make_inputs(torch.float32, device, requires_grad=True)
    sinks = torch.randn(4, device=device, requires_grad=True)

    def f(q, k, v, sinks):
        return flash_attention(q, k, v, causal=True, window_size=(8, 0), softcap=4.0, sinks=sinks).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(q, k, v, sinks)
    loss.backward()
    expected = [t.grad.clone() for t in (q, k, v, sinks)]
    for t in (q, k, v, sinks):
        t.grad = None
    f(q, k, v, sinks).backward()
    assert torch.equal(loss, f(q, k, v, sinks).detach())
    for grad, leaf in zip(expected, (q, k, v, sinks)):
        assert torch.equal(grad, leaf.grad)


def test_gradcheck_sinks_and_softcap(device):
    q, k, v = AttentionCase(1, 2, 1, 5, 6, 4, True).make_inputs(torch.float64, device, requires_grad=True)
    sinks = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    slopes = torch.rand(2, dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(
        lambda q, k, v, s: flash_attention(q, k, v, causal=True, window_size=(3, 0), softcap=2.0,
                                           alibi_slopes=slopes, sinks=s), (q, k, v, sinks), fast_mode=True)


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------
def test_bad_options_name_the_argument(device):
    q, k, v = AttentionCase(1, 4, 2, 8, 8, 16, False).make_inputs(torch.float32, device)
    with pytest.raises(ValueError, match="window_size left must be >= 0"):
        flash_attention(q, k, v, window_size=(-2, 0))
    with pytest.raises(TypeError, match="window_size must be a pair"):
        flash_attention(q, k, v, window_size=4)
    with pytest.raises(ValueError, match="softcap must be >= 0"):
        flash_attention(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(4,\) or \(1, 4\)"):
        flash_attention(q, k, v, alibi_slopes=torch.rand(2, device=device))
    with pytest.raises(ValueError, match=r"sinks must have shape \(4,\)"):
        flash_attention(q, k, v, sinks=torch.rand(4, 1, device=device))
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
            flash_attention(q, k, v, dropout_p=p)


def test_bad_cu_seqlens_name_the_argument(device):
    q, k, v, cu_q, cu_k = packed([5, 3], [5, 3], 2, 1, 16, torch.float32, device)
    # The offsets' values are read on the host only with validate=True (a sync); shapes and dtypes always.
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0 and never decrease"):
        flash_attention_varlen(q, k, v, torch.tensor([0, 6, 5, 8], dtype=torch.int32, device=device)[[0, 1, 3]]
                               .flip(0), cu_k, 5, 5, validate=True)
    with pytest.raises(ValueError, match="cu_seqlens_k must end at the number of packed tokens"):
        flash_attention_varlen(q, k, v, cu_q, torch.tensor([0, 5, 7], dtype=torch.int32, device=device), 5, 5,
                               validate=True)
    with pytest.raises(TypeError, match="cu_seqlens_q must be a 1-D int32 tensor"):
        flash_attention_varlen(q, k, v, cu_q.long(), cu_k, 5, 5)
    with pytest.raises(ValueError, match=r"max_seqlen_q \(4\) is shorter than the longest sequence"):
        flash_attention_varlen(q, k, v, cu_q, cu_k, 4, 5, validate=True)
    with pytest.raises(ValueError, match="q must have rank 3"):
        flash_attention_varlen(q[None], k, v, cu_q, cu_k, 5, 5)
    with pytest.raises(ValueError, match="cu_seqlens_q and cu_seqlens_k must describe the same number"):
        flash_attention_varlen(q, k, v, cu_q, cu_k[:2], 5, 5)
    with pytest.raises(TypeError, match="validate must be a bool"):
        flash_attention_varlen(q, k, v, cu_q, cu_k, 5, 5, validate=1)


def test_strided_option_tensors_read_as_their_values(device):
    """Sinks, slopes and cu_seqlens given as strided views give what their contiguous copies give."""
    q, k, v = AttentionCase(1, 4, 2, 33, 33, 16, True).make_inputs(torch.float32, device)
    sinks, slopes = torch.randn(4, 2, device=device)[:, 0], torch.rand(4, 3, device=device)[:, 1]
    assert torch.equal(flash_attention(q, k, v, causal=True, sinks=sinks, alibi_slopes=slopes),
                       flash_attention(q, k, v, causal=True, sinks=sinks.contiguous(),
                                       alibi_slopes=slopes.contiguous()))
    q, k, v, cu_q, cu_k = packed([5, 9], [5, 9], 2, 1, 16, torch.float32, device)
    strided_cu = torch.stack([cu_q, cu_q], dim=1)[:, 0]  # every other element of an interleaved buffer
    assert strided_cu.stride(0) == 2
    assert torch.equal(flash_attention_varlen(q, k, v, strided_cu, cu_k, 9, 9, causal=True),
                       flash_attention_varlen(q, k, v, cu_q, cu_k, 9, 9, causal=True))


def test_sinks_with_no_key_at_all(device):
    """With Nk = 0 every row is its sink alone: o = 0, lse = the sink, and d sink comes through the lse."""
    q = torch.randn(1, 2, 3, 8, device=device)
    k = v = torch.randn(1, 1, 0, 8, device=device)
    sinks = torch.randn(2, device=device, requires_grad=True)
    o, lse = flash_attention(q, k, v, sinks=sinks, return_lse=True)
    assert torch.equal(o, torch.zeros_like(o)) and torch.equal(lse, sinks.detach()[None, :, None].expand(1, 2, 3))
    (o.sum() + (2 * lse).sum()).backward()
    torch.testing.assert_close(sinks.grad, torch.full((2,), 6.0, device=device))  # 3 rows x d lse = 2
