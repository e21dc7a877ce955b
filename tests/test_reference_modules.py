"""The reference modules: equivalences with shared weights, properties, the attend hook, input errors.

Equivalences run in float64, where two ways of computing the same thing
agree to rounding, so a mismatch is a real difference and not noise.
"""
import math

import pytest
import torch
import torch.nn as nn

from reference import (
    CausalAttention,
    CrossAttention,
    EfficientMHA,
    FusedQKVMultiHeadAttention,
    GroupedQueryAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    MultiQueryAttention,
    SelfAttentionV1,
    SelfAttentionV2,
    apply_rope,
    future_mask,
    naive_attention,
    rope_tables,
)
from tests.helpers import assert_close

F64 = torch.float64
BATCH, NUM_TOKENS, CONTEXT_LENGTH = 2, 7, 10
D_IN, D_OUT, NUM_HEADS, NUM_KV_GROUPS = 12, 16, 4, 2
HEAD_DIM = D_OUT // NUM_HEADS
# CrossAttention's context: a different length and width from x.
CONTEXT_TOKENS, D_CONTEXT = 9, 5

# name -> (class, make(cls, dropout)). One table for every parametrised test
# below; `make` takes the class so the hook tests can build a subclass.
BUILDERS = {
    "SelfAttentionV1": (SelfAttentionV1, lambda cls, p: cls(D_IN, D_OUT)),
    "SelfAttentionV2": (SelfAttentionV2, lambda cls, p: cls(D_IN, D_OUT, qkv_bias=True)),
    "CausalAttention": (CausalAttention, lambda cls, p: cls(D_IN, D_OUT, CONTEXT_LENGTH, p, qkv_bias=True)),
    "CrossAttention": (CrossAttention, lambda cls, p: cls(D_IN, D_CONTEXT, D_OUT, p, qkv_bias=True)),
    "MultiHeadAttentionWrapper": (
        MultiHeadAttentionWrapper, lambda cls, p: cls(D_IN, D_OUT, CONTEXT_LENGTH, p, NUM_HEADS, qkv_bias=True)
    ),
    "MultiHeadAttention": (
        MultiHeadAttention, lambda cls, p: cls(D_IN, D_OUT, CONTEXT_LENGTH, p, NUM_HEADS, qkv_bias=True)
    ),
    "FusedQKVMultiHeadAttention": (
        FusedQKVMultiHeadAttention, lambda cls, p: cls(D_IN, D_OUT, CONTEXT_LENGTH, p, NUM_HEADS, qkv_bias=True)
    ),
    "EfficientMHA": (EfficientMHA, lambda cls, p: cls(D_IN, D_OUT, CONTEXT_LENGTH, p, NUM_HEADS, qkv_bias=True)),
    "GroupedQueryAttention": (
        GroupedQueryAttention, lambda cls, p: cls(D_IN, D_OUT, NUM_HEADS, NUM_KV_GROUPS, CONTEXT_LENGTH, dropout=p)
    ),
    "MultiQueryAttention": (
        MultiQueryAttention, lambda cls, p: cls(D_IN, D_OUT, NUM_HEADS, CONTEXT_LENGTH, dropout=p)
    ),
}
ALL = list(BUILDERS)
CAUSAL = [name for name in ALL if name not in ("SelfAttentionV1", "SelfAttentionV2", "CrossAttention")]
WITH_DROPOUT = [name for name in ALL if name not in ("SelfAttentionV1", "SelfAttentionV2")]


def build(name, dropout=0.0, cls=None):
    """The module (or an instance of `cls`, a subclass of it), in float64, in eval mode."""
    base, make = BUILDERS[name]
    return make(cls or base, dropout).to(F64).eval()


def tokens(batch=BATCH, num_tokens=NUM_TOKENS, width=D_IN):
    return torch.randn(batch, num_tokens, width, dtype=F64)


def call(module, x):
    """module(x), with a fixed context for CrossAttention, the one module that takes two inputs."""
    if isinstance(module, CrossAttention):
        generator = torch.Generator().manual_seed(1)
        context = torch.randn(BATCH, CONTEXT_TOKENS, D_CONTEXT, dtype=F64, generator=generator)
        return module(x, context)
    return module(x)


@pytest.mark.parametrize("name", ALL)
def test_output_shape(name):
    out = call(build(name), tokens())
    assert out.shape == (BATCH, NUM_TOKENS, D_OUT), f"{name}: output shape {tuple(out.shape)}"


# --- single-head modules ---------------------------------------------------------

def test_self_attention_v1_equals_v2_with_transposed_weights():
    v1 = build("SelfAttentionV1")
    v2 = SelfAttentionV2(D_IN, D_OUT).to(F64)
    with torch.no_grad():
        for name in ("W_query", "W_key", "W_value"):
            # nn.Linear computes x @ weight.T, so V2's weight is V1's matrix transposed.
            getattr(v2, name).weight.copy_(getattr(v1, name).T)
    x = tokens()
    assert_close(v2(x), v1(x), "SelfAttentionV2 vs SelfAttentionV1")


@pytest.mark.parametrize("name", ["SelfAttentionV2", "CausalAttention", "CrossAttention"])
def test_single_head_modules_equal_naive_attention(name):
    # The module's projections, fed to the functional reference as one head: (B, N, d) -> (B, 1, N, d).
    module = build(name)
    x = tokens()
    context = x
    if name == "CrossAttention":
        context = torch.randn(BATCH, CONTEXT_TOKENS, D_CONTEXT, dtype=F64)
        out = module(x, context)
    else:
        out = module(x)
    q = module.W_query(x)[:, None]
    k, v = module.W_key(context)[:, None], module.W_value(context)[:, None]
    expected = naive_attention(q, k, v, causal=module.causal)[:, 0]
    assert_close(out, expected, f"{name} vs naive_attention on its own projections")


# --- multi-head: four ways to write the same thing ----------------------------------

def test_mha_is_the_wrapper_followed_by_out_proj():
    # The wrapper has no out_proj, so the honest statement is: MultiHeadAttention
    # whose projections stack the heads' weights computes out_proj(wrapper(x)),
    # for whatever (here random) out_proj it has.
    wrapper, mha = build("MultiHeadAttentionWrapper"), build("MultiHeadAttention")
    with torch.no_grad():
        for name in ("W_query", "W_key", "W_value"):
            for part in ("weight", "bias"):
                # Head h's rows become rows h*head_dim:(h+1)*head_dim, the slice split_heads gives head h.
                stacked = torch.cat([getattr(getattr(head, name), part) for head in wrapper.heads])
                getattr(getattr(mha, name), part).copy_(stacked)
    x = tokens()
    assert_close(mha(x), mha.out_proj(wrapper(x)), "MultiHeadAttention vs out_proj(MultiHeadAttentionWrapper)")


def test_fused_qkv_equals_mha():
    mha, fused = build("MultiHeadAttention"), build("FusedQKVMultiHeadAttention")
    with torch.no_grad():
        # qkv's output features are [queries | keys | values].
        fused.qkv.weight.copy_(torch.cat([mha.W_query.weight, mha.W_key.weight, mha.W_value.weight]))
        fused.qkv.bias.copy_(torch.cat([mha.W_query.bias, mha.W_key.bias, mha.W_value.bias]))
        fused.out_proj.load_state_dict(mha.out_proj.state_dict())
    x = tokens()
    assert_close(fused(x), mha(x), "FusedQKVMultiHeadAttention vs MultiHeadAttention")


def test_efficient_mha_equals_fused_qkv():
    fused, efficient = build("FusedQKVMultiHeadAttention"), build("EfficientMHA")
    efficient.load_state_dict(fused.state_dict())  # same parameters and buffers by construction
    x = tokens()
    assert_close(efficient(x), fused(x), "EfficientMHA (SDPA) vs FusedQKVMultiHeadAttention (explicit math)")


def in_proj(module):
    """The module's q/k/v weights and biases stacked as nn.MultiheadAttention's in_proj."""
    if isinstance(module, FusedQKVMultiHeadAttention):
        return module.qkv.weight, module.qkv.bias
    w = [module.W_query, module.W_key, module.W_value]
    return torch.cat([p.weight for p in w]), torch.cat([p.bias for p in w])


@pytest.mark.parametrize("name", ["MultiHeadAttention", "FusedQKVMultiHeadAttention", "EfficientMHA"])
def test_matches_torch_multihead_attention(name):
    # nn.MultiheadAttention needs d_in == d_out (its embed_dim).
    module = BUILDERS[name][0](D_OUT, D_OUT, CONTEXT_LENGTH, 0.0, NUM_HEADS, qkv_bias=True).to(F64).eval()
    torch_mha = nn.MultiheadAttention(D_OUT, NUM_HEADS, bias=True, batch_first=True, dtype=F64).eval()
    with torch.no_grad():
        weight, bias = in_proj(module)
        torch_mha.in_proj_weight.copy_(weight)
        torch_mha.in_proj_bias.copy_(bias)
        torch_mha.out_proj.load_state_dict(module.out_proj.state_dict())
    x = tokens(width=D_OUT)
    # True = may not attend, the same convention as our mask buffer.
    expected, _ = torch_mha(x, x, x, attn_mask=future_mask(NUM_TOKENS), need_weights=False)
    assert_close(module(x), expected, f"{name} vs torch.nn.MultiheadAttention")


# --- grouped-query attention ------------------------------------------------------

def test_gqa_equals_gqa_with_every_kv_head_copied_into_its_group():
    # Sharing kv head j among query heads j*group .. (j+1)*group - 1 must equal
    # giving each query head its own copy of kv head j's weights.
    gqa = build("GroupedQueryAttention")
    full = GroupedQueryAttention(D_IN, D_OUT, NUM_HEADS, NUM_HEADS, CONTEXT_LENGTH).to(F64).eval()
    group = NUM_HEADS // NUM_KV_GROUPS

    def copied(w):
        # (num_kv_groups * head_dim, d_in) -> (num_kv_groups, head_dim, d_in) -> (num_heads, head_dim, d_in)
        return w.view(NUM_KV_GROUPS, HEAD_DIM, D_IN).repeat_interleave(group, dim=0).reshape(D_OUT, D_IN)

    full.load_state_dict({
        "q_proj.weight": gqa.q_proj.weight, "o_proj.weight": gqa.o_proj.weight,
        "k_proj.weight": copied(gqa.k_proj.weight), "v_proj.weight": copied(gqa.v_proj.weight),
    })
    x = tokens()
    assert_close(gqa(x), full(x), "GQA vs GQA with one copied kv head per query head")


def test_gqa_with_a_kv_head_per_query_head_is_mha_with_rope():
    # MHA has no position embedding and GQA does; rotating MHA's queries and
    # keys inside its attend hook is the only difference left. (The rotation
    # itself is checked against Meta's Llama 3 below.)
    gqa = GroupedQueryAttention(D_IN, D_OUT, NUM_HEADS, NUM_HEADS, CONTEXT_LENGTH, dtype=F64).eval()

    class MHAWithRoPE(MultiHeadAttention):
        def attend(self, queries, keys, values):
            n = queries.shape[-2]
            cos, sin = gqa.cos[:n], gqa.sin[:n]
            return super().attend(apply_rope(queries, cos, sin), apply_rope(keys, cos, sin), values)

    mha = MHAWithRoPE(D_IN, D_OUT, CONTEXT_LENGTH, 0.0, NUM_HEADS).to(F64).eval()
    with torch.no_grad():
        for ours, theirs in (("W_query", "q_proj"), ("W_key", "k_proj"), ("W_value", "v_proj"), ("out_proj", "o_proj")):
            getattr(mha, ours).weight.copy_(getattr(gqa, theirs).weight)
        mha.out_proj.bias.zero_()  # Llama's projections are bias-free
    x = tokens()
    assert_close(gqa(x), mha(x), "GQA(num_kv_groups=num_heads) vs MultiHeadAttention + RoPE")


def test_mqa_equals_gqa_with_one_kv_head():
    mqa = build("MultiQueryAttention")
    assert mqa.k_proj.weight.shape == (HEAD_DIM, D_IN), f"MQA k_proj shape {tuple(mqa.k_proj.weight.shape)}"
    gqa = GroupedQueryAttention(D_IN, D_OUT, NUM_HEADS, 1, CONTEXT_LENGTH).to(F64).eval()
    gqa.load_state_dict(mqa.state_dict())
    x = tokens()
    assert_close(mqa(x), gqa(x), "MultiQueryAttention vs GroupedQueryAttention(num_kv_groups=1)")


def test_rope_scores_depend_only_on_relative_position():
    # The same query and key vectors placed at every position: after RoPE, the
    # score of positions (m, n) must equal that of (m + 1, n + 1).
    cos, sin = rope_tables(HEAD_DIM * 4, 32, theta=10_000.0, dtype=F64)
    q = apply_rope(torch.randn(HEAD_DIM * 4, dtype=F64).expand(32, -1), cos, sin)
    k = apply_rope(torch.randn(HEAD_DIM * 4, dtype=F64).expand(32, -1), cos, sin)
    scores = q @ k.T  # (32, 32)
    assert_close(scores[1:, 1:], scores[:-1, :-1], "RoPE scores shifted by one position", atol=1e-10, rtol=1e-10)


def meta_llama3_attention(x, wq, wk, wv, wo, n_heads, n_kv_heads, theta):
    """Llama 3's Attention.forward as in Meta's model.py, without the kv cache: an independent reference.

    RoPE here multiplies ADJACENT feature pairs (2i, 2i+1), read as complex
    numbers, by e^(i * position * freq_i), built with torch.polar; the grouping
    repeats each kv head n_heads // n_kv_heads times, consecutively.
    """
    bsz, seqlen, _ = x.shape
    head_dim = wq.shape[0] // n_heads
    xq = (x @ wq.T).view(bsz, seqlen, n_heads, head_dim)
    xk = (x @ wk.T).view(bsz, seqlen, n_kv_heads, head_dim)
    xv = (x @ wv.T).view(bsz, seqlen, n_kv_heads, head_dim)

    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=F64) / head_dim)
    angles = torch.outer(torch.arange(seqlen, dtype=F64), freqs)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)  # (seqlen, head_dim // 2), complex

    def rotary(t):
        # (bsz, seqlen, heads, head_dim) -> (bsz, seqlen, heads, head_dim // 2) complex, pairs (2i, 2i+1)
        pairs = torch.view_as_complex(t.reshape(bsz, seqlen, t.shape[2], head_dim // 2, 2))
        return torch.view_as_real(pairs * freqs_cis[None, :, None, :]).flatten(3)

    xq, xk = rotary(xq), rotary(xk)
    xk = xk.repeat_interleave(n_heads // n_kv_heads, dim=2)
    xv = xv.repeat_interleave(n_heads // n_kv_heads, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (xq, xk, xv))
    scores = q @ k.transpose(2, 3) / math.sqrt(head_dim)
    scores = scores + torch.full((seqlen, seqlen), float("-inf"), dtype=F64).triu(1)
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).reshape(bsz, seqlen, -1) @ wo.T


def hf_permute(w, n_heads):
    """HF's convert_llama_weights_to_hf permutation: per head, adjacent pairs (2i, 2i+1) -> (i, i + head_dim/2)."""
    out_features, in_features = w.shape
    return w.view(n_heads, out_features // n_heads // 2, 2, in_features).transpose(1, 2).reshape(
        out_features, in_features
    )


def test_gqa_reproduces_meta_llama3_attention():
    dim, n_heads, n_kv_heads, seqlen, theta = 128, 8, 2, 12, 500_000.0
    head_dim = dim // n_heads
    wq = torch.randn(dim, dim, dtype=F64) / math.sqrt(dim)
    wk = torch.randn(n_kv_heads * head_dim, dim, dtype=F64) / math.sqrt(dim)
    wv = torch.randn(n_kv_heads * head_dim, dim, dtype=F64) / math.sqrt(dim)
    wo = torch.randn(dim, dim, dtype=F64) / math.sqrt(dim)
    x = torch.randn(BATCH, seqlen, dim, dtype=F64)
    expected = meta_llama3_attention(x, wq, wk, wv, wo, n_heads, n_kv_heads, theta)

    gqa = GroupedQueryAttention(dim, dim, n_heads, n_kv_heads, seqlen, rope_theta=theta, dtype=F64).eval()
    gqa.load_state_dict({
        "q_proj.weight": hf_permute(wq, n_heads), "k_proj.weight": hf_permute(wk, n_kv_heads),
        "v_proj.weight": wv, "o_proj.weight": wo,
    })
    assert_close(gqa(x), expected, "GQA with HF-permuted weights vs Meta's Llama 3 attention")

    # Control: without the permutation the pairs are wrong and so are the outputs,
    # which shows the comparison above is sensitive to the RoPE convention.
    gqa.load_state_dict({"q_proj.weight": wq, "k_proj.weight": wk, "v_proj.weight": wv, "o_proj.weight": wo})
    difference = (gqa(x) - expected).abs().max().item()
    assert difference > 1e-3, f"unpermuted weights should not reproduce Meta's layer, max difference {difference:.2e}"


def test_gqa_state_dict_has_llamas_keys_and_shapes():
    gqa = build("GroupedQueryAttention")
    shapes = {key: tuple(t.shape) for key, t in gqa.state_dict().items()}
    kv_width = NUM_KV_GROUPS * HEAD_DIM
    # The mask and the rotary tables are derived, not learned: non-persistent, not in a checkpoint.
    assert shapes == {
        "q_proj.weight": (D_OUT, D_IN), "k_proj.weight": (kv_width, D_IN),
        "v_proj.weight": (kv_width, D_IN), "o_proj.weight": (D_OUT, D_OUT),
    }, f"state_dict {shapes}"


def test_causal_attention_keeps_its_mask_in_the_state_dict():
    state = build("CausalAttention").state_dict()
    assert torch.equal(state["mask"], future_mask(CONTEXT_LENGTH)), "persistent upper-triangle mask expected"


# --- properties ----------------------------------------------------------------------

@pytest.mark.parametrize("name", CAUSAL)
def test_causal_output_ignores_later_tokens(name):
    module = build(name)
    x = tokens()
    t = 3
    changed = x.clone()
    changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:])
    out, out_changed = module(x), module(changed)
    what = f"{name}: outputs up to position {t} after changing later tokens"
    assert_close(out_changed[:, :t + 1], out[:, :t + 1], what)
    assert not torch.allclose(out_changed[:, t + 1:], out[:, t + 1:]), f"{name}: later outputs ignored their new input"


def test_non_causal_output_sees_later_tokens():
    # The control for the test above: it can tell a causal module from a non-causal one.
    module = build("SelfAttentionV2")
    x = tokens()
    changed = x.clone()
    changed[:, -1] += 1.0
    assert not torch.allclose(module(changed)[:, 0], module(x)[:, 0]), "the first output should see the last token"


@pytest.mark.parametrize("name", WITH_DROPOUT)
def test_dropout_only_in_training(name):
    module = build(name, dropout=0.5)
    assert isinstance(module.dropout, nn.Dropout) and module.dropout.p == 0.5, f"{name}.dropout: {module.dropout!r}"
    x = tokens()
    eval_out = call(module, x)
    assert torch.equal(call(module, x), eval_out), f"{name}: two eval-mode calls differ"
    module.train()
    train_out = call(module, x)
    assert not torch.allclose(train_out, eval_out), f"{name}: dropout p=0.5 changed nothing in training mode"


@pytest.mark.parametrize("name", ALL)
def test_hook_attributes(name):
    module = build(name)
    assert module.causal is (name in CAUSAL), f"{name}.causal is {module.causal}"
    assert isinstance(module.dropout, nn.Dropout), f"{name}.dropout is {type(module.dropout).__name__}"


# --- the attend hook --------------------------------------------------------------

def expected_attend_shapes(name):
    """The (queries, keys, values) shapes of each `attend` call, per the hook contract."""
    single = (BATCH, NUM_TOKENS, D_OUT)
    heads = (BATCH, NUM_HEADS, NUM_TOKENS, HEAD_DIM)
    if name == "CrossAttention":
        context = (BATCH, CONTEXT_TOKENS, D_OUT)
        return [(single, context, context)]
    if name == "MultiHeadAttentionWrapper":
        head = (BATCH, NUM_TOKENS, HEAD_DIM)
        return [(head, head, head)] * NUM_HEADS  # one call per head
    if name in ("GroupedQueryAttention", "MultiQueryAttention"):
        # keys and values arrive un-repeated, with their own number of heads.
        kv_heads = NUM_KV_GROUPS if name == "GroupedQueryAttention" else 1
        kv = (BATCH, kv_heads, NUM_TOKENS, HEAD_DIM)
        return [(heads, kv, kv)]
    if name in ("MultiHeadAttention", "FusedQKVMultiHeadAttention", "EfficientMHA"):
        return [(heads, heads, heads)]
    return [(single, single, single)]


def twin_class(name, attend):
    """A subclass that overrides only `attend`, the way a Triton twin does.

    attend(module, queries, keys, values, reference_attend) -> output. For the
    wrapper the twin overrides `head_class` instead, with a twinned CausalAttention.
    """
    base = BUILDERS[name][0]
    if base is MultiHeadAttentionWrapper:
        return type("TwinWrapper", (base,), {"head_class": twin_class("CausalAttention", attend)})

    def overridden(self, queries, keys, values):
        return attend(self, queries, keys, values, super(twin, self).attend)

    twin = type(f"Twin{base.__name__}", (base,), {"attend": overridden})
    return twin


@pytest.mark.parametrize("name", ALL)
def test_forward_routes_through_attend_with_the_contracted_shapes(name):
    calls = []

    def spy(module, queries, keys, values, reference_attend):
        out = reference_attend(queries, keys, values)
        calls.append((tuple(queries.shape), tuple(keys.shape), tuple(values.shape)))
        assert out.shape == queries.shape, f"attend returned {tuple(out.shape)} for queries {tuple(queries.shape)}"
        return out

    reference = build(name)
    twin = build(name, cls=twin_class(name, spy))
    # A twin holds exactly the reference's parameters and buffers.
    twin.load_state_dict(reference.state_dict())
    x = tokens()
    assert_close(call(twin, x), call(reference, x), f"{name}: twin that defers to the reference attend")
    assert calls == expected_attend_shapes(name), f"{name}: attend saw {calls}"


@pytest.mark.parametrize("name", ALL)
def test_forward_uses_what_attend_returns(name):
    # An attend returning zeros leaves only what follows it: the output
    # projection's bias where there is one, else zeros.
    twin = build(name, cls=twin_class(name, lambda module, q, k, v, reference_attend: torch.zeros_like(q)))
    out = call(twin, tokens())
    projection = getattr(twin, "out_proj", None) or getattr(twin, "o_proj", None)
    expected = torch.zeros(BATCH, NUM_TOKENS, D_OUT, dtype=F64)
    if projection is not None:
        expected = projection(expected)
    assert_close(out, expected, f"{name}: output when attend returns zeros")


# --- input errors -------------------------------------------------------------------

MULTI_HEAD_CLASSES = [MultiHeadAttentionWrapper, MultiHeadAttention, FusedQKVMultiHeadAttention, EfficientMHA]


@pytest.mark.parametrize("cls", MULTI_HEAD_CLASSES, ids=lambda c: c.__name__)
def test_d_out_must_divide_into_heads(cls):
    with pytest.raises(ValueError, match=r"d_out \(18\) must be divisible by num_heads \(4\)"):
        cls(D_IN, 18, CONTEXT_LENGTH, 0.0, 4)
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        cls(D_IN, D_OUT, CONTEXT_LENGTH, 0.0, 0)


@pytest.mark.parametrize(
    "make, match",
    [
        pytest.param(lambda: GroupedQueryAttention(D_IN, 18, 4, 2, CONTEXT_LENGTH), r"d_out \(18\)", id="d_out"),
        pytest.param(lambda: MultiQueryAttention(D_IN, 18, 4, CONTEXT_LENGTH), r"d_out \(18\)", id="mqa-d_out"),
        pytest.param(
            lambda: GroupedQueryAttention(D_IN, 24, 6, 4, CONTEXT_LENGTH),
            r"num_heads \(6\) must be divisible by num_kv_groups \(4\)",
            id="num_kv_groups",
        ),
        pytest.param(lambda: GroupedQueryAttention(D_IN, 12, 4, 2, CONTEXT_LENGTH), "head_dim .* must be even",
                     id="odd-head_dim"),
        pytest.param(lambda: GroupedQueryAttention(D_IN, D_OUT, 4, 2.0, CONTEXT_LENGTH), "num_kv_groups must be an int",
                     id="float-num_kv_groups"),
    ],
)
def test_gqa_constructor_errors(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@pytest.mark.parametrize("name", ALL)
def test_x_must_be_a_batch_of_token_vectors(name):
    module = build(name)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        call(module, tokens().tolist())
    with pytest.raises(ValueError, match=r"x must have shape \(batch, tokens, d_in\), got shape \(7, 12\)"):
        call(module, tokens()[0])
    with pytest.raises(ValueError, match="x has last dimension 11 but d_in is 12"):
        call(module, tokens(width=D_IN - 1))


@pytest.mark.parametrize("name", CAUSAL)
def test_x_may_not_exceed_context_length(name):
    with pytest.raises(ValueError, match="x has 11 tokens but context_length is 10"):
        build(name)(tokens(num_tokens=CONTEXT_LENGTH + 1))


def test_cross_attention_context_errors():
    module = build("CrossAttention")
    x = tokens()
    with pytest.raises(ValueError, match="x and context must have the same batch size, got 2 and 3"):
        module(x, torch.randn(3, CONTEXT_TOKENS, D_CONTEXT, dtype=F64))
    with pytest.raises(ValueError, match="context has last dimension 4 but d_context is 5"):
        module(x, torch.randn(BATCH, CONTEXT_TOKENS, D_CONTEXT - 1, dtype=F64))
    with pytest.raises(ValueError, match=r"context must have shape \(batch, tokens, d_context\)"):
        module(x, torch.randn(CONTEXT_TOKENS, D_CONTEXT, dtype=F64))
