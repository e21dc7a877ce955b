"""The variant twins (sliding window, soft-capping, sinks), attention dropout on every backend, and the
twins' constructor signatures.

A stand-in `flash_attention` with the same keywords (naive math underneath)
also checks exactly what the twins hand to the kernel.
"""
import inspect
import pydoc
import warnings

import pytest
import torch

import modules
import modules.attention
import modules.variants
import reference
from reference import naive_attention
from tests.helpers import assert_close
from tests.test_modules import CONTEXT, D_IN, D_OUT, TWINS, check_twin

GQA = dict(d_in=D_IN, d_out=D_OUT, num_heads=4, num_kv_groups=2, context_length=CONTEXT)
# (twin, reference, constructor kwargs, the kernel keywords it needs). check_twin runs 19 tokens:
# a window of 5 or 7 keys cuts most rows; softcap 0.5 is below the scores' spread at this init.
VARIANTS = [
    pytest.param(modules.SlidingWindowAttention, reference.SlidingWindowAttention, dict(GQA, sliding_window=5),
                 ("window_size",), id="mistral-window5"),
    pytest.param(modules.SoftCappedAttention, reference.SoftCappedAttention,
                 dict(GQA, softcap=0.5, sliding_window=7), ("softcap", "window_size"), id="gemma2-softcap-window7"),
    pytest.param(modules.SinkAttention, reference.SinkAttention, dict(GQA, sliding_window=None), ("sinks",),
                 id="gpt-oss-sinks"),
]
SDPA_FALLBACK = pytest.mark.filterwarnings("ignore:.*SDPA has no")


def with_random_sinks(module):
    """Sinks start at 0; give each head its own so a mix-up between heads would show."""
    if hasattr(module, "sinks"):
        with torch.no_grad():
            module.sinks.copy_(torch.linspace(-1.0, 2.0, module.sinks.numel()))
    return module


# --- the twins of the variants -------------------------------------------------------

@pytest.mark.parametrize("twin_cls, reference_cls, kwargs, needs", VARIANTS)
def test_state_dict_round_trip(twin_cls, reference_cls, kwargs, needs):
    ref = with_random_sinks(reference_cls(**kwargs))
    twin = twin_cls(**kwargs)
    twin.load_state_dict(ref.state_dict())  # strict
    assert twin.state_dict().keys() == ref.state_dict().keys()
    for name, tensor in ref.state_dict().items():
        assert torch.equal(twin.state_dict()[name], tensor), name
    if "sinks" in needs:
        assert "sinks" in twin.state_dict() and twin.sinks.requires_grad


@pytest.mark.parametrize("twin_cls, reference_cls, kwargs, needs", VARIANTS)
def test_options_change_the_output(twin_cls, reference_cls, kwargs, needs):
    # Otherwise the comparisons below would pass with the option ignored.
    variant = with_random_sinks(reference_cls(**kwargs)).double()
    plain = reference.GroupedQueryAttention(**GQA).double()
    plain.load_state_dict(variant.state_dict(), strict=False)  # the projections; plain GQA has no sinks
    plain.cos, plain.sin = variant.cos, variant.sin  # the same rotary tables, so only the option differs
    x = torch.randn(2, 19, D_IN, dtype=torch.float64)
    assert (variant(x) - plain(x)).abs().max() > 1e-2, f"{reference_cls.__name__}: the option made no difference"


@SDPA_FALLBACK
@pytest.mark.parametrize("backend", ["sdpa", "naive"])
@pytest.mark.parametrize("twin_cls, reference_cls, kwargs, needs", VARIANTS)
def test_output_and_gradients_match_reference(twin_cls, reference_cls, kwargs, needs, backend, device):
    check_twin(twin_cls, reference_cls, kwargs, False, backend, torch.float32, device)


@pytest.mark.parametrize("twin_cls, reference_cls, kwargs, needs", VARIANTS)
def test_output_and_gradients_match_reference_on_triton(twin_cls, reference_cls, kwargs, needs, device):
    check_twin(twin_cls, reference_cls, kwargs, False, "triton", torch.float32, device)


@pytest.mark.parametrize("dtype, variant", [(torch.bfloat16, VARIANTS[1]), (torch.float16, VARIANTS[2])],
                         ids=["bfloat16-softcap-window", "float16-sinks"])
def test_low_precision_on_triton(dtype, variant, device):
    twin_cls, reference_cls, kwargs, needs = variant.values
    check_twin(twin_cls, reference_cls, kwargs, False, "triton", dtype, device)


def test_sdpa_backend_says_when_it_runs_naive_math():
    x = torch.randn(1, 6, D_IN)
    window = modules.SlidingWindowAttention(**GQA, sliding_window=3, backend="sdpa")
    assert "naive math" not in repr(window)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SDPA runs a window itself: no fallback, no warning
        window(x)
    for twin in (modules.SoftCappedAttention(**GQA, backend="sdpa"), modules.SinkAttention(**GQA, backend="sdpa")):
        lacking = "softcap" if isinstance(twin, modules.SoftCappedAttention) else "sinks"
        assert f"backend='sdpa' (naive math: SDPA has no {lacking})" in repr(twin)
        with pytest.warns(UserWarning, match=f"SDPA has no {lacking}; backend='sdpa' runs the reference's naive"):
            twin(x)
    capless = modules.SoftCappedAttention(**GQA, softcap=None, sliding_window=3, backend="sdpa")
    assert "naive math" not in repr(capless), "without a cap, SDPA runs it (the window as a dense mask)"


def stand_in_kernel(calls):
    """A flash_attention with issue 11's keywords on naive math, recording each call's keywords."""
    def flash_attention(q, k, v, causal=False, sm_scale=None, return_lse=False, window_size=None, softcap=None,
                        alibi_slopes=None, sinks=None, dropout_p=0.0, deterministic=True):
        calls.append(dict(causal=causal, window_size=window_size, softcap=softcap, sinks=sinks, dropout_p=dropout_p))
        mask = None
        if dropout_p > 0:
            mask = torch.rand(*q.shape[:-1], k.shape[-2], device=q.device) >= dropout_p
        return naive_attention(q, k, v, causal, sm_scale, window_size=window_size, softcap=softcap,
                               alibi_slopes=alibi_slopes, sinks=sinks, dropout_mask=mask, dropout_p=dropout_p)
    return flash_attention


@pytest.mark.parametrize("twin_cls, reference_cls, kwargs, needs", VARIANTS)
def test_triton_backend_hands_the_options_to_the_kernel(twin_cls, reference_cls, kwargs, needs, monkeypatch):
    calls = []
    kernel = stand_in_kernel(calls)
    monkeypatch.setattr(modules.variants, "flash_attention", kernel)
    monkeypatch.setattr(modules.attention, "flash_attention", kernel)
    ref = with_random_sinks(reference_cls(**kwargs)).double()
    twin = twin_cls(**kwargs).double()
    twin.load_state_dict(ref.state_dict())
    x = torch.randn(2, 19, D_IN, dtype=torch.float64)
    assert_close(twin(x), ref(x), f"{twin_cls.__name__} through the stand-in kernel vs the reference")
    (call,) = calls
    assert call["causal"] is True and call["dropout_p"] == 0.0
    window = kwargs.get("sliding_window")
    assert call["window_size"] == (None if window is None else (window - 1, 0)), call["window_size"]
    assert call["softcap"] == kwargs.get("softcap")
    if "sinks" in needs:
        assert call["sinks"].dtype == torch.float32 and call["sinks"].shape == (4,), "sinks go in as fp32 (Hq,)"
        twin(x).sum().backward()
        assert twin.sinks.grad is not None and twin.sinks.grad.abs().min() > 0, "the sinks' gradient comes back"
    else:
        assert call["sinks"] is None
    twin.train()
    twin.dropout.p = 0.25
    twin(x)
    assert calls[-1]["dropout_p"] == 0.25, "dropout in training goes to the kernel"


# --- attention dropout: the same contract on every backend ------------------------------

DROPOUT_P = 0.3
N_IDENTITY = 64  # 2080 causal (query, key) pairs: the kept fraction's standard deviation is about 0.01


def identity_attention(backend, device, dropout=DROPOUT_P):
    """CausalAttention that outputs its own weight matrix: zero query weights make every visible score 0,
    so P[i, j] = 1 / (i + 1) for j <= i, and with x = I and W_value = I the values are I."""
    module = modules.CausalAttention(N_IDENTITY, N_IDENTITY, N_IDENTITY, dropout, backend=backend).to(device)
    with torch.no_grad():
        module.W_query.weight.zero_()
        module.W_value.weight.copy_(torch.eye(N_IDENTITY))
    x = torch.eye(N_IDENTITY, device=device)[None]  # (1, N, N): token t is the unit vector e_t
    rows = torch.arange(1, N_IDENTITY + 1, device=device, dtype=torch.float32)[:, None]
    weights = torch.ones(N_IDENTITY, N_IDENTITY, device=device).tril() / rows  # (N, N): P without dropout
    return module, x, weights


def dropout_backend(backend, monkeypatch):
    """The backend to build; "stand-in" is triton with the stand-in kernel, which records what it is handed."""
    if backend == "stand-in":
        monkeypatch.setattr(modules.attention, "flash_attention", stand_in_kernel([]))
        return "triton"
    return backend


DROPOUT_BACKENDS = ["triton", "stand-in", "sdpa", "naive"]


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_dropout_keeps_about_one_minus_p_and_rescales_the_kept(backend, device, monkeypatch):
    module, x, weights = identity_attention(dropout_backend(backend, monkeypatch), device)
    out = module.train()(x)[0]  # (N, N): the weights after dropout
    visible = weights > 0
    kept = (out != 0) & visible
    fraction = kept.sum().item() / visible.sum().item()
    sigma = (DROPOUT_P * (1 - DROPOUT_P) / visible.sum().item()) ** 0.5
    assert abs(fraction - (1 - DROPOUT_P)) < 4 * sigma, \
        f"kept {fraction:.3f}, expected {1 - DROPOUT_P} +- {4 * sigma:.3f}"
    assert torch.equal(out[~visible], torch.zeros_like(out[~visible])), "masked pairs stay 0"
    assert_close(out[kept], (weights / (1 - DROPOUT_P))[kept], f"{backend}: kept weights are P / (1 - p)",
                 atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_dropout_same_seed_same_output_and_gradients(backend, device, monkeypatch):
    module, x, _ = identity_attention(dropout_backend(backend, monkeypatch), device)
    module.train()
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        out = module(x)
        out.sum().backward()
        runs.append((out.detach(), module.W_key.weight.grad.clone()))
        module.zero_grad()
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), "same seed: bitwise equal"
    assert not torch.equal(runs[0][0], runs[2][0]), "another seed draws another mask"


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_eval_mode_has_no_dropout(backend, device, monkeypatch):
    module, x, weights = identity_attention(dropout_backend(backend, monkeypatch), device)
    out = module.eval()(x)[0]
    assert_close(out, weights, f"{backend} in eval mode: the weights themselves", atol=1e-6, rtol=1e-5)


def test_variant_twin_dropout_is_repeatable_on_triton(device):
    twin = modules.SinkAttention(**GQA, sliding_window=5, dropout=0.2).to(device).train()
    x = torch.randn(2, 19, D_IN, device=device)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(twin(x))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


# --- constructor signatures ------------------------------------------------------------

ALL_TWINS = [pytest.param(p.values[0], p.values[1], id=p.id) for p in TWINS + VARIANTS]


@pytest.mark.parametrize("twin_cls, reference_cls", ALL_TWINS)
def test_signature_is_the_reference_constructor_plus_backend(twin_cls, reference_cls):
    reference_params = list(inspect.signature(reference_cls).parameters.values())
    backend = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="triton")
    assert inspect.signature(twin_cls) == inspect.Signature(reference_params + [backend])


@pytest.mark.parametrize("twin_cls, reference_cls", ALL_TWINS)
def test_help_shows_the_real_parameters(twin_cls, reference_cls):
    text = pydoc.render_doc(twin_cls, renderer=pydoc.plaintext)
    signature = str(inspect.signature(twin_cls))
    assert f"{twin_cls.__name__}{signature}" in text, text[:600]
    assert f"__init__(self, {signature[1:]}" in text, "the __init__ entry shows the real parameters too"
    assert "__init__(self, *args" not in text


def test_twins_still_take_positional_arguments_and_refuse_unknown_ones():
    twin = modules.GroupedQueryAttention(D_IN, D_OUT, 4, 2, CONTEXT, 10_000.0, None, 0.0, backend="sdpa")
    assert (twin.num_kv_groups, twin.backend, twin.dropout.p) == (2, "sdpa", 0.0)
    with pytest.raises(TypeError, match="sliding_windw"):
        modules.SlidingWindowAttention(**GQA, sliding_windw=4)
