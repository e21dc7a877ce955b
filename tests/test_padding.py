"""Padded batches through the varlen path (modules/padding.py): unpad/pad, and padded_attention.

padded_attention must equal attention run on each sequence's real tokens
alone, whatever the padding (left, right, none, everything), with padded
queries at exactly 0, on the reference path in float64 and on the Triton
path (kernels.flash_attention_varlen).
"""
import pytest
import torch

from modules import pad_input, padded_attention, unpad_input
from reference import naive_attention
from tests.helpers import assert_close, assert_close_to_reference

F64 = torch.float64


def padding_mask(lengths, seqlen, side):
    """(B, seqlen) bool, True on each sequence's `length` real tokens, padded on the left or the right."""
    positions = torch.arange(seqlen)[None, :]
    lengths = torch.tensor(lengths)[:, None]
    return positions >= seqlen - lengths if side == "left" else positions < lengths


# A full row, an empty row (all padding), a single token and two ragged ones.
LENGTHS = [9, 0, 1, 4, 6]
SIDES = ["left", "right"]


@pytest.mark.parametrize("side", SIDES)
def test_unpad_packs_the_real_tokens_in_order_and_pad_inverts_it(side):
    x = torch.randn(len(LENGTHS), 9, 2, 3, dtype=F64)
    mask = padding_mask(LENGTHS, 9, side)
    packed, indices, cu_seqlens, max_seqlen = unpad_input(x, mask)
    assert packed.shape == (sum(LENGTHS), 2, 3)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 9, 9, 10, 14, 20]
    assert max_seqlen == 9 and isinstance(max_seqlen, int)
    assert torch.equal(packed, torch.cat([x[b][mask[b]] for b in range(len(LENGTHS))]))
    back = pad_input(packed, indices, len(LENGTHS), 9)
    assert torch.equal(back, x * mask[:, :, None, None]), "real tokens back in place, zeros at the padding"


def test_pad_and_unpad_pass_gradients():
    mask = padding_mask([3, 1], 4, "left")
    x = torch.randn(2, 4, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: unpad_input(t, mask)[0], (x,))
    _, indices, _, _ = unpad_input(x, mask)
    packed = torch.randn(4, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pad_input(t, indices, 2, 4), (packed,))


def test_padding_errors_name_the_argument():
    x = torch.randn(2, 4, 3)
    with pytest.raises(TypeError, match="attention_mask must be a bool tensor"):
        unpad_input(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, tokens\) = \(2, 4\), got \(2, 5\)"):
        unpad_input(x, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="indices must have shape"):
        pad_input(torch.randn(3, 2), torch.arange(2), 1, 4)
    q = torch.randn(2, 2, 4, 8)
    with pytest.raises(ValueError, match="backend must be one of 'triton', 'naive'"):
        padded_attention(q, q, q, torch.ones(2, 4, dtype=torch.bool), backend="sdpa")
    with pytest.raises(TypeError, match="return_lse is not supported"):
        padded_attention(q, q, q, torch.ones(2, 4, dtype=torch.bool), return_lse=True)
    with pytest.raises(ValueError, match="k must be a tensor of shape"):
        padded_attention(q, q[0], q, torch.ones(2, 4, dtype=torch.bool))


# (n_q, options, side): Nq = Nk is a prefill, padded on either side; Nq = 1 < Nk is a decoding step,
# which appends on the right, so its cache is padded on the left.
PADDED_CASES = [
    *[pytest.param(9, options, side, id=f"{name}-{side}") for side in SIDES for name, options in (
        ("full", dict(causal=False)),
        ("causal", dict(causal=True)),
        ("causal-window-softcap", dict(causal=True, window_size=(2, 0), softcap=2.0)),
        ("causal-sinks", dict(causal=True, sinks=True)),
    )],
    pytest.param(1, dict(causal=True), "left", id="decode-one-query-left"),
]


def resolve(options, h_q, dtype=F64):
    options = dict(options)
    if options.get("sinks"):
        options["sinks"] = torch.linspace(-1, 1, h_q, dtype=torch.float32 if dtype != F64 else F64)
    return options


def per_sequence(q, k, v, mask, dtype, **options):
    """Attention on each sequence's real tokens alone, in `dtype`; zeros at padded queries."""
    n_q = q.shape[2]
    out = torch.zeros(q.shape, dtype=dtype)
    for b in range(q.shape[0]):
        keys, queries = mask[b], mask[b, -n_q:]
        out[b, :, queries] = naive_attention(q[b:b + 1, :, queries], k[b:b + 1, :, keys], v[b:b + 1, :, keys],
                                             dtype=dtype, **options)[0]
    return out


@pytest.mark.parametrize("n_q, options, side", PADDED_CASES)
def test_padded_attention_equals_each_sequence_alone(n_q, options, side):
    h_q, h_kv = 4, 2
    options = resolve(options, h_q)
    mask = padding_mask(LENGTHS, 9, side)
    if n_q < 9:
        mask[:, -1] = True  # the token being decoded is real in every sequence
    q = torch.randn(len(LENGTHS), h_q, n_q, 8, dtype=F64)
    k, v = torch.randn(2, len(LENGTHS), h_kv, 9, 8, dtype=F64)
    out = padded_attention(q, k, v, mask, backend="naive", **options)
    assert out.shape == q.shape
    assert_close(out, per_sequence(q, k, v, mask, F64, **options), "padded_attention vs each sequence alone")
    padded = ~mask[:, -n_q:]
    assert torch.equal(out.transpose(1, 2)[padded], torch.zeros_like(out.transpose(1, 2)[padded]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("side", SIDES)
def test_padded_attention_on_triton(side, dtype, device):
    h_q, h_kv = 4, 2
    options = dict(causal=True, window_size=(3, 0))
    mask = padding_mask(LENGTHS, 9, side).to(device)
    q = torch.randn(len(LENGTHS), h_q, 9, 16, device=device, dtype=dtype)
    k, v = torch.randn(2, len(LENGTHS), h_kv, 9, 16, device=device, dtype=dtype)
    out = padded_attention(q, k, v, mask, **options)
    reference64 = padded_attention(q.double(), k.double(), v.double(), mask, backend="naive", **options)
    torch_same_dtype = padded_attention(q, k, v, mask, backend="naive", **options)
    assert_close_to_reference(out, reference64, torch_same_dtype, name=f"padded_attention triton {dtype}")
    padded = ~mask
    assert (out.transpose(1, 2)[padded] == 0).all(), "padded queries output exactly 0"


def test_triton_backend_hands_packed_inputs_to_the_varlen_kernel(monkeypatch):
    # Before the merge, a stand-in with flash_attention_varlen's signature checks the hand-over.
    import kernels
    from reference import naive_attention_varlen

    calls = []

    def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                               **options):
        calls.append((q.shape, k.shape, cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), max_seqlen_q, max_seqlen_k))
        return naive_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, **options)

    monkeypatch.setattr(kernels, "flash_attention_varlen", flash_attention_varlen, raising=False)
    mask = padding_mask(LENGTHS, 9, "left")
    q, k, v = torch.randn(3, len(LENGTHS), 4, 9, 8, dtype=F64)
    out = padded_attention(q, k, v, mask, causal=True)
    assert calls == [((20, 4, 8), (20, 4, 8), [0, 9, 9, 10, 14, 20], [0, 9, 9, 10, 14, 20], 9, 9)]
    assert_close(out, padded_attention(q, k, v, mask, causal=True, backend="naive"), "triton path vs naive path")


def test_padded_attention_reads_each_distinct_mask_once(monkeypatch):
    """Unpadding reads the mask (nonzero's output size is data): once in a prefill, where queries and keys share
    it, twice in a decoding step. The longest length is bounded by the padded width, never read (item, int)."""
    reads = []
    for method in ("nonzero", "item", "__int__"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda t, *args, _m=method, _o=original, **kwargs: (
            reads.append(_m), _o(t, *args, **kwargs))[1])
    mask = padding_mask([5, 2], 5, "left")
    q, k, v = torch.randn(3, 2, 2, 5, 8)
    padded_attention(q, k, v, mask, causal=True)
    assert reads == ["nonzero"]
    reads.clear()
    padded_attention(q[:, :, -1:], k, v, mask, causal=True)
    assert reads == ["nonzero", "nonzero"]
