"""The reference variants on the naive scores (window, ALiBi, softcap, sinks, dropout mask, packed varlen),
and the model zoo's modules that use them (reference/model_variants.py).

Each variant is checked against something written independently of
reference/functional.py: explicit Python loops over (i, j), SDPA with a dense
mask, FlashAttention's own ALiBi formula, or a property the math implies (a
sink only rescales a row; a row with no visible key is 0). Everything runs in
float64 on tiny shapes, where two ways of computing the same thing agree to
rounding.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from reference import (GroupedQueryAttention, SinkAttention, SlidingWindowAttention, SoftCappedAttention, alibi_bias,
                       causal_visibility, explicit_attention, naive_attention, naive_attention_varlen, repeat_kv,
                       window_visibility)
from tests.helpers import assert_close

F64 = torch.float64

# (n_q, n_k, window_size): why each is there.
WINDOWS = [
    pytest.param(9, 9, (2, 0), id="mistral-like-left2"),  # the sliding window (W - 1, 0) with W = 3
    pytest.param(9, 9, (1, 3), id="both-sides"),  # a right side too: tokens ahead are visible
    pytest.param(5, 12, (3, 1), id="nq<nk"),  # the diagonal is shifted by Nk - Nq = 7 (decoding with a cache)
    pytest.param(12, 5, (2, 2), id="nq>nk"),  # shifted by -7: the first rows see no key at all
    pytest.param(7, 7, (None, 2), id="left-unlimited"),
    pytest.param(7, 7, (-1, 0), id="minus-one-is-unlimited"),  # FlashAttention's spelling of None
    pytest.param(7, 7, (0, 0), id="diagonal-only"),
]


def loop_visibility(n_q, n_k, window_size, causal=False):
    """The window rule, written element by element."""
    left, right = window_size
    unlimited = lambda side: side is None or side < 0  # noqa: E731
    visible = torch.zeros(n_q, n_k, dtype=torch.bool)
    for i in range(n_q):
        diagonal = i + n_k - n_q
        for j in range(n_k):
            ok = (unlimited(left) or j >= diagonal - left) and (unlimited(right) or j <= diagonal + right)
            visible[i, j] = ok and (not causal or j <= diagonal)
    return visible


def rand(*shape):
    return torch.randn(*shape, dtype=F64)


def identity_values(b, h, n_k):
    """v = I, so attention's output is its weight matrix: out[..., i, j] = P[i, j] (needs head_dim = Nk)."""
    return torch.eye(n_k, dtype=F64).expand(b, h, n_k, n_k)


# --- sliding window ------------------------------------------------------------

@pytest.mark.parametrize("n_q, n_k, window_size", WINDOWS)
def test_window_visibility_matches_loops(n_q, n_k, window_size):
    assert torch.equal(window_visibility(n_q, n_k, window_size), loop_visibility(n_q, n_k, window_size))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n_q, n_k, window_size", WINDOWS)
def test_window_attention_matches_sdpa_with_a_dense_mask(n_q, n_k, window_size, causal):
    q, k, v = rand(2, 4, n_q, 8), rand(2, 2, n_k, 8), rand(2, 2, n_k, 8)
    out = naive_attention(q, k, v, causal=causal, window_size=window_size)
    visible = loop_visibility(n_q, n_k, window_size, causal)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
    seen = visible.any(dim=-1)
    assert seen.any(), "every case must have rows that see a key"
    assert_close(out[:, :, seen], expected[:, :, seen], "window attention vs SDPA with the dense mask")
    blind = out[:, :, ~seen]
    assert torch.equal(blind, torch.zeros_like(blind)), "rows with no visible key must be exactly 0"


@pytest.mark.parametrize("n_q, n_k", [(9, 9), (4, 9), (9, 4)])
def test_window_unlimited_left_and_zero_right_is_causal(n_q, n_k):
    for left in (None, -1):
        assert torch.equal(window_visibility(n_q, n_k, (left, 0)), causal_visibility(n_q, n_k))
    q, k, v = rand(1, 2, n_q, 8), rand(1, 2, n_k, 8), rand(1, 2, n_k, 8)
    assert_close(naive_attention(q, k, v, window_size=(None, 0)), naive_attention(q, k, v, causal=True),
                 "window (None, 0) vs causal")


def test_window_wider_than_the_sequence_changes_nothing():
    q, k, v = rand(1, 2, 9, 8), rand(1, 2, 9, 8), rand(1, 2, 9, 8)
    assert_close(naive_attention(q, k, v, causal=True, window_size=(9, 0)), naive_attention(q, k, v, causal=True),
                 "a causal window of the whole length vs causal")
    assert_close(naive_attention(q, k, v, window_size=(9, 9)), naive_attention(q, k, v), "window (9, 9) vs full")


# --- ALiBi ---------------------------------------------------------------------

@pytest.mark.parametrize("n_q, n_k", [(6, 6), (3, 8), (8, 3)])
def test_alibi_bias_matches_a_loop(n_q, n_k):
    slopes = torch.tensor([[0.5, 0.25, 0.125], [1.0, 0.1, 0.0]], dtype=F64)  # (B, Hq)
    bias = alibi_bias(slopes, n_q, n_k, F64)
    assert bias.shape == (2, 3, n_q, n_k)
    expected = torch.empty(2, 3, n_q, n_k, dtype=F64)
    for b in range(2):
        for h in range(3):
            for i in range(n_q):
                for j in range(n_k):
                    expected[b, h, i, j] = -slopes[b, h] * abs(i + n_k - n_q - j)
    assert_close(bias, expected, "alibi_bias vs loops")
    assert_close(alibi_bias(slopes[0], n_q, n_k, F64), expected[:1], "(Hq,) slopes broadcast over the batch")


def flash_attn_alibi_bias(slopes, n_q, n_k, causal):
    """FlashAttention's test reference (attn_bias_from_alibi_slopes), for (B, Hq) slopes, no padding."""
    slopes = slopes[:, :, None, None]  # (B, Hq) -> (B, Hq, 1, 1)
    if causal:
        return torch.arange(-n_k + 1, 1, dtype=F64) * slopes
    row = torch.arange(n_q)[:, None]
    col = torch.arange(n_k)[None, :]
    return -slopes * (row + n_k - n_q - col).abs()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n_q, n_k", [(6, 6), (3, 8)])
def test_alibi_follows_flash_attention_convention(n_q, n_k, causal):
    # With causal, FlashAttention's test adds slope * (j - (Nk - 1)): ours minus a constant per row,
    # which the softmax cancels. So the attention outputs agree either way.
    slopes = torch.rand(2, 4, dtype=F64)
    q, k, v = rand(2, 4, n_q, 8), rand(2, 4, n_k, 8), rand(2, 4, n_k, 8)
    out = naive_attention(q, k, v, causal=causal, alibi_slopes=slopes)
    mask = causal_visibility(n_q, n_k) if causal else torch.ones(n_q, n_k, dtype=torch.bool)
    bias = flash_attn_alibi_bias(slopes, n_q, n_k, causal).masked_fill(~mask, float("-inf"))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert_close(out, expected, "naive_attention with alibi vs FlashAttention's bias through SDPA")


# --- soft-capping ----------------------------------------------------------------

def test_softcap_is_tanh_of_the_scaled_scores_before_alibi_and_masks():
    q, k, v = rand(1, 2, 7, 8) * 3, rand(1, 2, 7, 8), rand(1, 2, 7, 8)
    softcap, slopes = 2.0, torch.tensor([0.3, 0.7], dtype=F64)
    out = naive_attention(q, k, v, causal=True, softcap=softcap, alibi_slopes=slopes)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    scores = softcap * torch.tanh(scores / softcap) + alibi_bias(slopes, 7, 7, F64)
    scores = scores.masked_fill(~causal_visibility(7, 7), float("-inf"))
    assert_close(out, torch.softmax(scores, dim=-1) @ v, "softcap, then ALiBi, then the mask")


def test_softcap_bounds_every_weight_ratio():
    # |capped score| < softcap, so in a row no weight is more than exp(2 softcap) times another.
    q, k = rand(1, 2, 6, 6) * 10, rand(1, 2, 6, 6) * 10
    softcap = 1.5
    weights = naive_attention(q, k, identity_values(1, 2, 6), softcap=softcap)
    ratio = weights.max(dim=-1).values / weights.min(dim=-1).values
    assert (ratio <= math.exp(2 * softcap)).all(), f"largest weight ratio {ratio.max():.3f}"
    uncapped = naive_attention(q, k, identity_values(1, 2, 6))
    assert (uncapped.max(dim=-1).values / uncapped.min(dim=-1).values).max() > math.exp(2 * softcap), \
        "the scores must be large enough for the cap to matter"


def test_softcap_none_or_zero_is_off():
    q, k, v = rand(1, 2, 5, 8), rand(1, 2, 5, 8), rand(1, 2, 5, 8)
    plain = naive_attention(q, k, v)
    for softcap in (None, 0, 0.0):
        assert torch.equal(naive_attention(q, k, v, softcap=softcap), plain), softcap


# --- sinks -------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sink_only_rescales_each_row(causal):
    # The sink joins the normaliser: out = out_plain * exp(lse_plain) / (exp(lse_plain) + exp(sink)),
    # and lse = logaddexp(lse_plain, sink).
    q, k, v = rand(2, 4, 6, 9), rand(2, 2, 9, 9), rand(2, 2, 9, 9)
    sinks = torch.tensor([-1.0, 0.0, 0.5, 3.0], dtype=F64)
    out, lse = naive_attention(q, k, v, causal=causal, sinks=sinks, return_lse=True)
    plain, plain_lse = naive_attention(q, k, v, causal=causal, return_lse=True)
    sink = sinks[None, :, None]  # (Hq,) -> (1, Hq, 1)
    assert_close(lse, torch.logaddexp(plain_lse, sink), "lse with the sink")
    assert_close(out, plain * torch.exp(plain_lse - lse)[..., None], "output with the sink")
    weights = naive_attention(q, k, identity_values(2, 2, 9), causal=causal, sinks=sinks)
    assert_close(weights.sum(dim=-1), 1 - torch.exp(sink - lse), "row sums: what the sink leaves")


def test_sinks_at_minus_infinity_are_no_sinks():
    q, k, v = rand(1, 4, 6, 8), rand(1, 2, 6, 8), rand(1, 2, 6, 8)
    out, lse = naive_attention(q, k, v, causal=True, sinks=torch.full((4,), float("-inf"), dtype=F64),
                               return_lse=True)
    plain, plain_lse = naive_attention(q, k, v, causal=True, return_lse=True)
    assert_close(out, plain, "output, sinks -inf vs none")
    assert_close(lse, plain_lse, "lse, sinks -inf vs none")


@pytest.mark.parametrize("with_sinks", [False, True], ids=["no-sinks", "sinks"])
def test_row_with_no_visible_key_outputs_zero(with_sinks):
    # causal with Nq > Nk: the first Nq - Nk queries see no key.
    q, k, v = rand(1, 2, 7, 8), rand(1, 2, 4, 8), rand(1, 2, 4, 8)
    sinks = torch.tensor([0.25, -2.0], dtype=F64) if with_sinks else None
    out, lse = naive_attention(q, k, v, causal=True, sinks=sinks, return_lse=True)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3])), "blind rows must be exactly 0"
    assert torch.isfinite(out).all()
    expected_lse = sinks[None, :, None].expand(1, 2, 3) if with_sinks else torch.full((1, 2, 3), float("-inf"))
    assert torch.equal(lse[:, :, :3], expected_lse.to(F64)), "blind rows: lse is the sink, or -inf without one"


def test_gradients_reach_the_sinks():
    q, k, v = rand(1, 2, 4, 3), rand(1, 1, 5, 3), rand(1, 1, 5, 3)
    sinks = torch.tensor([0.3, -0.4], dtype=F64)
    leaves = [t.requires_grad_() for t in (q, k, v, sinks)]
    fn = lambda q, k, v, s: naive_attention(q, k, v, causal=True, sinks=s, window_size=(2, 0))  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)
    fn(*leaves).sum().backward()
    assert sinks.grad.abs().min() > 0, f"every head's sink gets a gradient, got {sinks.grad}"


# --- dropout mask ------------------------------------------------------------------

def test_dropout_mask_zeroes_weights_and_rescales_the_kept_ones():
    p = 0.25
    q, k = rand(1, 2, 6, 6), rand(1, 2, 6, 6)
    mask = torch.rand(1, 2, 6, 6) >= p
    weights = naive_attention(q, k, identity_values(1, 2, 6), causal=True)
    dropped = naive_attention(q, k, identity_values(1, 2, 6), causal=True, dropout_mask=mask, dropout_p=p)
    assert_close(dropped, weights * mask / (1 - p), "weights after the dropout mask")
    v = rand(1, 2, 6, 6)
    out = naive_attention(q, k, v, causal=True, dropout_mask=mask, dropout_p=p)
    assert_close(out, (weights * mask / (1 - p)) @ v, "output after the dropout mask")
    keep_all = naive_attention(q, k, v, dropout_mask=torch.ones(1, 2, 6, 6, dtype=torch.bool), dropout_p=p)
    assert_close(keep_all, naive_attention(q, k, v) / (1 - p), "a mask that keeps everything only rescales")


# --- varlen ------------------------------------------------------------------------

def pack(lengths, heads, head_dim):
    """Random packed (total, heads, head_dim) and its int32 cu_seqlens."""
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return rand(int(cu[-1]), heads, head_dim), cu


# Lengths 0 (an empty sequence), 1 and 257 (several 64-blocks and a 1-row tail) in one batch;
# Nq != Nk per sequence, both ways, with an empty q next to a non-empty k and vice versa.
VARLEN_Q = [3, 0, 1, 257, 5, 4]
VARLEN_K = [3, 2, 1, 257, 0, 9]
VARLEN_OPTIONS = [
    pytest.param(dict(causal=False), id="full"),
    pytest.param(dict(causal=True), id="causal"),
    pytest.param(dict(causal=True, window_size=(4, 0), softcap=3.0), id="causal-window-softcap"),
    pytest.param(dict(causal=False, window_size=(2, 1), sinks=True), id="window-sinks"),
    pytest.param(dict(causal=True, alibi_slopes=True), id="causal-alibi-per-sequence"),
]


def per_sequence_options(options, h_q, n_seq):
    """Turn the True placeholders into tensors: sinks (Hq,), ALiBi slopes (B, Hq)."""
    options = dict(options)
    if options.get("sinks"):
        options["sinks"] = torch.linspace(-1, 1, h_q, dtype=F64)
    if options.get("alibi_slopes"):
        options["alibi_slopes"] = torch.rand(n_seq, h_q, dtype=F64)
    return options


@pytest.mark.parametrize("options", VARLEN_OPTIONS)
def test_varlen_equals_each_sequence_alone(options):
    h_q, h_kv, d = 4, 2, 8
    options = per_sequence_options(options, h_q, len(VARLEN_Q))
    q, cu_q = pack(VARLEN_Q, h_q, d)
    k, cu_k = pack(VARLEN_K, h_kv, d)
    v = rand(k.shape[0], h_kv, d)
    out, lse = naive_attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **options)
    assert out.shape == q.shape and lse.shape == (h_q, q.shape[0])
    for b in range(len(VARLEN_Q)):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        # (N_b, H, D) -> (1, H, N_b, D)
        q_b, k_b, v_b = (t.transpose(0, 1)[None] for t in (q[rows], k[keys], v[keys]))
        alone = dict(options)
        if "alibi_slopes" in alone:
            alone["alibi_slopes"] = alone["alibi_slopes"][b]
        o_b, lse_b = naive_attention(q_b, k_b, v_b, return_lse=True, **alone)
        assert_close(out[rows], o_b[0].transpose(0, 1), f"sequence {b} output")
        assert torch.equal(lse[:, rows].isfinite(), lse_b[0].isfinite()), f"sequence {b}: -inf lse rows"
        finite = lse_b[0].isfinite()
        assert_close(lse[:, rows][finite], lse_b[0][finite], f"sequence {b} lse")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_equals_one_packed_sequence_with_a_block_diagonal_mask(causal):
    # Independent of naive_attention: SDPA over the whole packed batch, each query allowed
    # only its own sequence's keys (bottom-right causal within the sequence).
    h_q, h_kv, d = 4, 2, 8
    q, cu_q = pack(VARLEN_Q, h_q, d)
    k, cu_k = pack(VARLEN_K, h_kv, d)
    v = rand(k.shape[0], h_kv, d)
    out = naive_attention_varlen(q, k, v, cu_q, cu_k, causal=causal)
    visible = torch.zeros(q.shape[0], k.shape[0], dtype=torch.bool)
    for b in range(len(VARLEN_Q)):
        n_q, n_k = VARLEN_Q[b], VARLEN_K[b]
        block = causal_visibility(n_q, n_k) if causal else torch.ones(n_q, n_k, dtype=torch.bool)
        visible[cu_q[b]:cu_q[b + 1], cu_k[b]:cu_k[b + 1]] = block
    # (total, H, D) -> (1, H, total, D)
    packed = [t.transpose(0, 1)[None] for t in (q, repeat_kv_packed(k, h_q // h_kv), repeat_kv_packed(v, h_q // h_kv))]
    expected = F.scaled_dot_product_attention(*packed, attn_mask=visible)[0].transpose(0, 1)
    seen = visible.any(dim=-1)
    assert_close(out[seen], expected[seen], "varlen vs a block-diagonal mask")
    assert (~seen).any() and torch.equal(out[~seen], torch.zeros_like(out[~seen])), "keyless rows are 0"


def repeat_kv_packed(x, n_rep):
    # (total, Hkv, D) -> (1, Hkv, total, D) -> (1, Hq, total, D) -> (total, Hq, D)
    return repeat_kv(x.transpose(0, 1)[None], n_rep)[0].transpose(0, 1)


def test_varlen_dropout_masks_are_per_sequence():
    p = 0.5
    q, cu_q = pack([3, 5], 2, 4)
    k, cu_k = pack([4, 5], 2, 4)
    masks = [torch.rand(1, 2, 3, 4) >= p, torch.rand(1, 2, 5, 5) >= p]
    out = naive_attention_varlen(q, k, k, cu_q, cu_k, causal=True, dropout_mask=masks, dropout_p=p)
    for b, mask in enumerate(masks):
        q_b = q[cu_q[b]:cu_q[b + 1]].transpose(0, 1)[None]
        k_b = k[cu_k[b]:cu_k[b + 1]].transpose(0, 1)[None]
        expected = naive_attention(q_b, k_b, k_b, causal=True, dropout_mask=mask, dropout_p=p)
        assert_close(out[cu_q[b]:cu_q[b + 1]], expected[0].transpose(0, 1), f"sequence {b} with its mask")


# --- the model zoo's variants (reference/model_variants.py) ---------------------------

GQA = dict(d_in=12, d_out=16, num_heads=4, num_kv_groups=2, context_length=16)


def plain_gqa_like(variant):
    """GroupedQueryAttention with the variant's projections and rotary tables: only the option differs."""
    plain = GroupedQueryAttention(**GQA).to(F64)
    plain.load_state_dict(variant.state_dict(), strict=False)  # plain GQA has no sinks
    plain.cos, plain.sin = variant.cos, variant.sin
    return plain


def test_sliding_window_module_masks_outside_the_window():
    module = SlidingWindowAttention(**GQA, sliding_window=3).to(F64)
    q, k, v = rand(2, 4, 9, 4), rand(2, 2, 9, 4), rand(2, 2, 9, 4)
    # Query i sees keys i-2, i-1, i: hide everything else, on keys copied out per query head.
    hidden = ~loop_visibility(9, 9, (2, 0), causal=True)
    expected = explicit_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), hidden=hidden)
    assert_close(module.attend(q, k, v), expected, "SlidingWindowAttention.attend vs explicit_attention")


@pytest.mark.parametrize("build", [
    pytest.param(lambda: SlidingWindowAttention(**GQA, sliding_window=None), id="window-none"),
    pytest.param(lambda: SlidingWindowAttention(**GQA, sliding_window=16), id="window-of-the-context"),
    pytest.param(lambda: SoftCappedAttention(**GQA, softcap=None), id="softcap-none"),
    pytest.param(lambda: SinkAttention(**GQA), id="sinks-minus-infinity"),
])
def test_variant_without_its_option_is_plain_gqa(build):
    variant = build().to(F64)
    if isinstance(variant, SinkAttention):
        with torch.no_grad():
            variant.sinks.fill_(float("-inf"))
    x = rand(2, 9, 12)
    assert_close(variant(x), plain_gqa_like(variant)(x), f"{type(variant).__name__} without its option vs GQA")


def test_softcap_module_caps_the_scaled_scores():
    module = SoftCappedAttention(**GQA, softcap=0.7, sliding_window=4).to(F64)
    q, k, v = rand(1, 4, 8, 4) * 3, rand(1, 2, 8, 4), rand(1, 2, 8, 4)
    scores = q @ repeat_kv(k, 2).transpose(-2, -1) / 2.0  # sqrt(head_dim = 4)
    scores = (0.7 * torch.tanh(scores / 0.7)).masked_fill(~loop_visibility(8, 8, (3, 0), causal=True), float("-inf"))
    assert_close(module.attend(q, k, v), torch.softmax(scores, dim=-1) @ repeat_kv(v, 2), "softcap + window")


def test_sink_module_learns_its_sinks():
    module = SinkAttention(**GQA, sliding_window=4).to(F64)
    assert "sinks" in module.state_dict() and module.sinks.shape == (4,)
    module(rand(2, 9, 12)).sum().backward()
    assert module.sinks.grad is not None and (module.sinks.grad != 0).all(), module.sinks.grad


def test_variant_dropout_draws_what_gqa_draws():
    # The dropout mask comes from nn.Dropout's own draw: same seed, same weights dropped as GQA.
    variant = SlidingWindowAttention(**GQA, sliding_window=None, dropout=0.4).to(F64).train()
    plain = plain_gqa_like(variant)
    plain.dropout.p = 0.4
    plain.train()
    x = rand(2, 9, 12)
    outs = []
    for module in (variant, plain):
        torch.manual_seed(5)
        outs.append(module(x))
    assert_close(outs[0], outs[1], "SlidingWindowAttention vs GQA, dropout with the same seed")
    assert not torch.allclose(outs[0], variant.eval()(x)), "training mode must drop something"


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sliding_window=0), ValueError, "sliding_window must be >= 1"),
    (dict(sliding_window=2.5), TypeError, "sliding_window must be an int or None, got float"),
    (dict(softcap=-1.0), ValueError, "softcap must be a positive number or None, got -1.0"),
    (dict(softcap=0), ValueError, "softcap must be a positive number or None, got 0"),
])
def test_variant_constructor_errors_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        SoftCappedAttention(**GQA, **kwargs)
