"""Hugging Face transformers on our kernels (modules/hf.py), against attn_implementation="eager".

Every model is built here from a tiny config with random weights (nothing
comes from a hub), and the same weights run once on eager and once on
"playground". Each model brings what its attention needs: Llama GQA and
RoPE, Mistral a sliding window shorter than the sequence, Gemma 2
soft-capping and a window on alternate layers, gpt-oss sinks and a window.
Each case first checks that its features change eager's logits, so a match
proves the kernels applied them. Generation is checked token for token, with
the kernel each step ran on and the host syncs of the attention and mask
functions counted (HostSyncs: none in a generation step).
"""
import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")

import kernels  # noqa: E402
import modules.hf as hf  # noqa: E402
from tests.helpers import assert_close_to_reference  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VOCAB, SEQLEN = 96, 12
WINDOW = 4  # shorter than SEQLEN and than a prompt plus its new tokens, so it masks something
PAD = 0
# Sizes the interpreter runs quickly (its cost grows with batch x heads): head_dim 16, and two query
# heads over one key/value head, except Llama's GQA with 4 over 2.
# initializer_range 0.1 (transformers' default is 0.02) makes the scores large enough for the
# window, the cap and the sinks to change the output well beyond rounding.
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, initializer_range=0.1, pad_token_id=PAD, bos_token_id=1,
              eos_token_id=2, attention_dropout=0.0)


def _config(name, features=True):
    """The tiny config of model `name`; features=False turns its attention variants off (same weights)."""
    if name == "llama":
        return transformers.LlamaConfig(**{**COMMON, "num_attention_heads": 4, "num_key_value_heads": 2})
    if name == "mistral":
        return transformers.MistralConfig(**COMMON, sliding_window=WINDOW if features else None)
    if name == "gemma2":
        return transformers.Gemma2Config(**COMMON, sliding_window=WINDOW if features else 4096,
                                         attn_logit_softcapping=2.0 if features else None,
                                         final_logit_softcapping=None, query_pre_attn_scalar=16)
    if name == "gpt_oss":
        return transformers.GptOssConfig(**COMMON, sliding_window=WINDOW if features else 4096, num_local_experts=4,
                                         num_experts_per_tok=2)
    raise ValueError(name)


# Llama: GQA and RoPE, nothing else. Mistral: a window on every layer. Gemma 2: softcap on every
# layer, a window on the first (layer_types alternate). gpt-oss: sinks (trainable) and a window.
MODELS = ["llama", "mistral", "gemma2",
          pytest.param("gpt_oss", marks=pytest.mark.skipif(not hasattr(transformers, "GptOssConfig"),
                                                           reason="this transformers has no gpt-oss"))]
WINDOWED = ["mistral", "gemma2"]


def build(name, device, dtype=torch.float32, features=True, **sizes):
    """Model `name` with seeded random weights; gpt-oss's sinks, zeros at init, get random values too."""
    torch.manual_seed(0)
    config = _config(name, features)
    for size, value in sizes.items():
        setattr(config, size, value)
    model = getattr(transformers, {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                   "gemma2": "Gemma2ForCausalLM", "gpt_oss": "GptOssForCausalLM"}[name])(config)
    for module in model.modules():
        if hasattr(module, "sinks"):
            torch.nn.init.normal_(module.sinks, std=2.0) if features else torch.nn.init.constant_(module.sinks, -1e4)
    return model.to(device=device, dtype=dtype).eval()


def logits(model, implementation, ids, **kwargs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(ids, **kwargs).logits


def left_padded(lengths, device, seqlen=SEQLEN):
    """Random prompts of these lengths, left-padded to seqlen: ids, attention_mask (1 = real) and position_ids."""
    ids = torch.randint(3, VOCAB, (len(lengths), seqlen), device=device)
    mask = (torch.arange(seqlen, device=device) >= seqlen - torch.tensor(lengths, device=device)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask, (mask.cumsum(dim=1) - 1).clamp(min=0)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    hf.register()


def test_register_is_idempotent_and_fills_both_hooks():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert hf.register() == hf.NAME == "playground"
    assert transformers.AttentionInterface()[hf.NAME] is hf.playground_attention
    assert ALL_MASK_ATTENTION_FUNCTIONS[hf.NAME] is hf.playground_mask
    model = build("llama", "cpu")
    model.set_attn_implementation(hf.NAME)
    assert model.config._attn_implementation == hf.NAME


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_eager_in_fp32(name, device):
    ids = torch.randint(3, VOCAB, (2, SEQLEN), device=device)
    model = build(name, device)
    eager = logits(model, "eager", ids)
    if name != "llama":  # the window, cap or sinks must change eager's answer, or matching proves nothing
        plain = logits(build(name, device, features=False), "eager", ids)
        assert (plain - eager).abs().max() > 1e-2, f"{name}'s attention variants do not change its logits"
    ours = logits(model, hf.NAME, ids)
    torch.testing.assert_close(ours, eager, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_logits_obey_the_tolerance_rule_in_bf16(name, device):
    ids = torch.randint(3, VOCAB, (2, SEQLEN), device=device)
    reference64 = logits(build(name, device, torch.float64), "eager", ids)
    model = build(name, device, torch.bfloat16)
    assert_close_to_reference(logits(model, hf.NAME, ids), reference64, logits(model, "eager", ids), name="logits")


@pytest.mark.parametrize("name", MODELS)
def test_training_step_loss_and_every_gradient_match_eager(name, device):
    ids = torch.randint(3, VOCAB, (2, SEQLEN), device=device)
    results = {}
    for implementation in ("eager", hf.NAME):
        model = build(name, device).train()
        model.set_attn_implementation(implementation)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results[implementation] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    (loss_eager, grads_eager), (loss_ours, grads_ours) = results["eager"], results[hf.NAME]
    torch.testing.assert_close(loss_ours, loss_eager, atol=1e-5, rtol=1e-5)
    assert grads_ours.keys() == grads_eager.keys()
    for parameter, grad in grads_eager.items():
        if grad is None:  # e.g. an expert no token was routed to, in both runs
            assert grads_ours[parameter] is None, parameter
            continue
        torch.testing.assert_close(grads_ours[parameter], grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda message, p=parameter: f"gradient of {p}: {message}")


@pytest.mark.parametrize("name", MODELS)
def test_left_padded_batch_gives_each_prompt_its_logits_alone(name, device):
    lengths = [SEQLEN, SEQLEN - 5, 2]  # full, ragged, and shorter than the window
    ids, mask, positions = left_padded(lengths, device)
    model = build(name, device)
    batch = logits(model, hf.NAME, ids, attention_mask=mask, position_ids=positions)
    for row, length in enumerate(lengths):  # eager alone = ours alone, by test_logits_match_eager_in_fp32
        alone = logits(model, "eager", ids[row:row + 1, SEQLEN - length:])
        torch.testing.assert_close(batch[row:row + 1, SEQLEN - length:], alone, atol=2e-5, rtol=1e-5)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every call to the kernels' public functions, as (name, Nq) (Nq None for packed inputs), in order."""
    calls = []
    for function_name in ("flash_attention", "flash_attention_varlen", "paged_attention"):
        original = getattr(kernels, function_name)

        def wrapper(q, *args, _name=function_name, _original=original, **kwargs):
            calls.append((_name, q.shape[-2] if q.dim() == 4 else None))
            return _original(q, *args, **kwargs)
        monkeypatch.setattr(kernels, function_name, wrapper)
    return calls


# ----------------------------------------------------------------------------
# Host syncs. A minimal stand-in for tests/sync_guard.py's no_host_sync(), which another branch adds:
# switch to it when it lands.
# ----------------------------------------------------------------------------
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "is_nonzero", "item", "equal"})


class HostSyncs(TorchDispatchMode):
    """`with HostSyncs() as syncs:` lists in syncs.seen every operation that makes the host wait for the device.

    Those are the ops that read device data on the host (_local_scalar_dense, behind item(), bool() and int();
    nonzero, whose output size is data; is_nonzero; equal), copies from a device to the host, and Tensor.tolist,
    which on the CPU reads memory without dispatching anything (on a GPU it dispatches a device-to-host copy).
    """

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        if name in SYNC_OPS:
            self.seen.append(name)
        elif name in ("_to_copy", "copy_"):
            source, target = (args[0], kwargs.get("device")) if name == "_to_copy" else (args[1], args[0].device)
            if source.device.type != "cpu" and target is not None and torch.device(target).type == "cpu":
                self.seen.append(f"{name} to the host")
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        seen, tolist = self.seen, self._tolist

        def recorded_tolist(tensor):
            seen.append("tolist")
            return tolist(tensor)
        torch.Tensor.tolist = recorded_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def test_the_sync_guard_sees_every_kind_of_read():
    t = torch.arange(4)
    with HostSyncs() as syncs:
        bool(t[1]), t[1].item(), int(t[2]), t.tolist(), t.nonzero(), torch.equal(t, t)
        t.sum(), t.cumsum(0), t.index_select(0, t.argmax()[None])  # device-side work only (t[t.argmax()] reads)
    assert syncs.seen == ["_local_scalar_dense"] * 3 + ["tolist", "nonzero", "equal"]


@pytest.fixture
def sync_log():
    """Run each call of the playground attention and mask functions under HostSyncs: (function, Nq, syncs) in order."""
    log = []

    def watched(function, label, n_q):
        def wrapper(*args, **kwargs):
            with HostSyncs() as syncs:
                out = function(*args, **kwargs)
            log.append((label, n_q(args, kwargs), syncs.seen))
            return out
        return wrapper
    transformers.AttentionInterface.register(hf.NAME, watched(hf.playground_attention, "attention",
                                                              lambda args, kwargs: args[1].shape[2]))
    mask_queries = (lambda args, kwargs: kwargs["q_length"] if "q_length" in kwargs
                    else kwargs["cache_position"].shape[0])
    transformers.masking_utils.AttentionMaskInterface.register(hf.NAME, watched(hf.playground_mask, "mask",
                                                                                mask_queries))
    yield log
    hf.register()


def generate_both(model, ids, mask, new_tokens, **config):
    """Greedy generate() on eager and on ours: (eager's tokens, ours)."""
    config = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD,
                                           eos_token_id=None, **config)
    tokens = []
    for implementation in ("eager", hf.NAME):
        model.set_attn_implementation(implementation)
        tokens.append(model.generate(ids, attention_mask=mask, generation_config=config))
    return tokens


def assert_generation_steps_are_paged_and_sync_free(sync_log, kernel_calls, layers, steps):
    """Every one-token step: each layer on paged_attention, no sync in the attention or the mask function."""
    decode = [entry for entry in sync_log if entry[1] == 1]
    assert [entry for entry in decode if entry[0] == "attention"] == [("attention", 1, [])] * layers * steps
    assert decode and all(syncs == [] for _, _, syncs in decode), decode
    assert kernel_calls[-layers * steps:] == [("paged_attention", 1)] * layers * steps


def test_greedy_generation_of_a_padded_batch_gives_eagers_tokens_on_paged_attention_without_a_sync(
        device, sync_log, kernel_calls):
    """Gemma 2: the cap, and a window that the prompts plus 12 tokens outgrow, on a hybrid cache (one layer
    sliding, one full); two query heads over one key/value head keep the interpreted decode calls quick.
    The left-padded prefill runs on paged_attention too (cache_leftpad), without the varlen path's unpadding."""
    ids, mask, _ = left_padded([7, 3], device, seqlen=7)
    model = build("gemma2", device)
    eager, ours = generate_both(model, ids, mask, 12)
    assert eager.shape == (2, 7 + 12)
    assert torch.equal(ours, eager)
    layers = model.config.num_hidden_layers
    assert kernel_calls[:layers] == [("paged_attention", 7)] * layers, "the prefill"
    assert_generation_steps_are_paged_and_sync_free(sync_log, kernel_calls, layers, 11)


@pytest.mark.parametrize("name, cache, lengths", [
    pytest.param("llama", "static", [6, 2], id="llama-static-cache"),
    pytest.param("mistral", None, [6, 6], id="mistral-unpadded"),
    pytest.param("gpt_oss", None, [6, 2], marks=MODELS[-1].marks, id="gpt_oss")])
def test_generation_steps_run_on_paged_attention_with_no_sync_per_layer(name, cache, lengths, device, sync_log,
                                                                         kernel_calls):
    """Llama on a static cache (keys past the written length are empty slots), Mistral's window with no padding,
    gpt-oss's sinks and window (Gemma 2's cap is above): eager's tokens, and every step on paged_attention with
    no sync in the attention or mask function. Without padding the prefill's mask function finds none (one read
    per forward) and the prefill runs on flash_attention; a padded or static-cache prefill on paged_attention."""
    ids, mask, _ = left_padded(lengths, device, seqlen=6)
    model = build(name, device)
    eager, ours = generate_both(model, ids, mask, 4, cache_implementation=cache)
    assert torch.equal(ours, eager)
    layers = model.config.num_hidden_layers
    prefill = "flash_attention" if min(lengths) == 6 and cache is None else "paged_attention"
    assert kernel_calls[:layers] == [(prefill, 6)] * layers
    assert_generation_steps_are_paged_and_sync_free(sync_log, kernel_calls, layers, 3)


def test_cached_steps_with_gradients_stay_on_flash_attention(device, kernel_calls):
    """paged_attention has no backward: a cached step that needs gradients runs on flash_attention."""
    module = build("llama", device).model.layers[0].self_attn
    q, k, v = torch.randn(1, 4, 1, 16, device=device), *torch.randn(2, 1, 2, 9, 16, device=device)
    hf.playground_attention(module, q, k, v, None, sliding_window=WINDOW, softcap=2.0)
    hf.playground_attention(module, q.requires_grad_(), k, v, None, sliding_window=WINDOW, softcap=2.0)
    assert kernel_calls == [("paged_attention", 1), ("flash_attention", 1)]


def test_attention_dropout_reaches_the_kernel_in_training_only(device, monkeypatch):
    seen = []
    original = kernels.flash_attention
    monkeypatch.setattr(kernels, "flash_attention",
                        lambda *args, **kwargs: seen.append(kwargs.get("dropout_p")) or original(*args, **kwargs))
    model = build("llama", device, attention_dropout=0.25)
    model.set_attn_implementation(hf.NAME)
    ids = torch.randint(3, VOCAB, (1, SEQLEN), device=device)
    model.train()(ids)
    model.eval()(ids)
    assert seen == [0.25] * 2 + [None] * 2


# ----------------------------------------------------------------------------
# Masks: the 4-D forms, and the fallback for what the kernels cannot express
# ----------------------------------------------------------------------------
def additive(keep):
    """A bool (B, 1, Nq, Nk) mask as transformers' eager float mask: 0 where kept, finfo.min elsewhere."""
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


def test_a_4d_causal_padding_mask_reduces_to_the_varlen_path(device, kernel_calls):
    ids, mask, positions = left_padded([SEQLEN, 5], device)
    model = build("mistral", device)
    keep = mask.bool()[:, None, None, :] & torch.ones(SEQLEN, SEQLEN, dtype=torch.bool).tril() \
        & torch.ones(SEQLEN, SEQLEN, dtype=torch.bool).triu(-(WINDOW - 1))  # causal, window, padding
    four_d = additive(keep).to(device)
    eager = logits(model, "eager", ids, attention_mask=four_d, position_ids=positions)
    hf._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = logits(model, hf.NAME, ids, attention_mask=four_d, position_ids=positions)
    assert not [w for w in caught if hf.NAME in str(w.message)], "no fallback"
    assert kernel_calls == [("flash_attention_varlen", None)] * model.config.num_hidden_layers
    real = mask.bool()
    torch.testing.assert_close(ours[real], eager[real], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name, as_bool", [("llama", False), ("gemma2", True)])
def test_an_arbitrary_4d_mask_runs_on_the_kernels_dense_mask_path(name, as_bool, device, kernel_calls):
    """Two sequences packed in one row (a block-diagonal causal mask), as eager's additive float mask or as a bool
    one (Gemma 2's softcap and window too): the kernels' attn_bias or attn_mask path, no fallback, eager's logits."""
    ids = torch.randint(3, VOCAB, (1, SEQLEN), device=device)
    segment = torch.tensor([0] * 5 + [1] * (SEQLEN - 5))
    keep = (segment[:, None] == segment[None, :]) & torch.ones(SEQLEN, SEQLEN, dtype=torch.bool).tril()
    if name == "gemma2":
        keep = keep & torch.ones(SEQLEN, SEQLEN, dtype=torch.bool).triu(-(WINDOW - 1))  # the window, on all layers
    eager_mask = additive(keep[None, None]).to(device)
    positions = torch.cat([torch.arange(5), torch.arange(SEQLEN - 5)])[None].to(device)
    model = build(name, device)
    eager = logits(model, "eager", ids, attention_mask=eager_mask, position_ids=positions)
    hf._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = logits(model, hf.NAME, ids, attention_mask=keep[None, None].to(device) if as_bool else eager_mask,
                      position_ids=positions)
    assert not [w for w in caught if hf.NAME in str(w.message)], "no fallback"
    assert kernel_calls == [("flash_attention", SEQLEN)] * model.config.num_hidden_layers
    torch.testing.assert_close(ours, eager, atol=2e-5, rtol=1e-5)


def test_sequences_packed_through_position_ids_run_on_the_varlen_kernel(device, kernel_calls):
    """transformers' packed convention (position_ids restart at 0 for each sequence in a row, no mask, no cache):
    eager builds a document mask; ours hands the sequences to flash_attention_varlen, with Gemma 2's window (shorter
    than both sequences of row 0) and cap. Each sequence comes out as if it ran alone."""
    ids = torch.randint(3, VOCAB, (2, SEQLEN), device=device)
    positions = torch.stack([torch.cat([torch.arange(5), torch.arange(SEQLEN - 5)]), torch.arange(SEQLEN)]).to(device)
    model = build("gemma2", device)
    eager = logits(model, "eager", ids, position_ids=positions, use_cache=False)
    alone = logits(model, "eager", ids[:1, :5], use_cache=False)
    torch.testing.assert_close(eager[:1, :5], alone, atol=2e-5, rtol=1e-5)  # eager's document mask
    hf._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = logits(model, hf.NAME, ids, position_ids=positions, use_cache=False)
    assert not [w for w in caught if hf.NAME in str(w.message)], "no fallback"
    assert kernel_calls == [("flash_attention_varlen", None)] * model.config.num_hidden_layers
    torch.testing.assert_close(ours, eager, atol=2e-5, rtol=1e-5)


def mask_sizes(n_q, kv_length, past=0):
    """The mask function's size arguments for Nq queries after `past` cached keys, in this transformers' names."""
    if "q_length" in inspect.signature(transformers.masking_utils.sdpa_mask).parameters:  # transformers 5
        return dict(q_length=n_q, q_offset=past, kv_length=kv_length)
    return dict(cache_position=torch.arange(past, past + n_q), kv_length=kv_length)  # 4.x


def spans_of(starts, ends):
    return torch.tensor([starts, ends], dtype=torch.int32)[:, :, None, None]


def test_the_mask_function_returns_what_the_kernels_can_use(device):
    from transformers.masking_utils import chunked_causal_mask_function, sdpa_mask, \
        sliding_window_causal_mask_function

    left = left_padded([SEQLEN, 5], device)[1].bool()
    right = left.flip(1)
    args = dict(batch_size=2, kv_offset=0, device=device)
    prefill = dict(args, **mask_sizes(SEQLEN, SEQLEN))
    assert hf.playground_mask(**prefill) is None, "no padding: the kernel's own causal masking"
    assert hf.playground_mask(**prefill, attention_mask=torch.ones_like(left)) is None, "a mask with no padding"
    # Left padding: key spans [start, end) per row, for paged_attention's cache_leftpad and seqused_k.
    assert torch.equal(hf.playground_mask(**prefill, attention_mask=left), spans_of([0, 7], [12, 12]))
    assert torch.equal(hf.playground_mask(**prefill, attention_mask=right), right), "right padding: the varlen path"
    window = sliding_window_causal_mask_function(WINDOW)
    assert torch.equal(hf.playground_mask(**prefill, attention_mask=right, mask_function=window, local_size=WINDOW),
                       right)
    hole = right.clone()
    hole[0, 3] = False  # a padded token between real ones would shift a packed window: transformers' own mask
    for mask_function, attention_mask in ((window, hole), (chunked_causal_mask_function(3, torch.zeros(2, dtype=int)),
                                                          left)):
        full = sdpa_mask(**prefill, mask_function=mask_function, attention_mask=attention_mask,
                         allow_is_causal_skip=False)
        assert torch.equal(hf.playground_mask(**prefill, mask_function=mask_function, attention_mask=attention_mask),
                           full)
    # A static cache of 20 slots holding 12 tokens: only the first 12 keys are real.
    assert torch.equal(hf.playground_mask(**args, **mask_sizes(SEQLEN, 20)), spans_of([0, 0], [12, 12]))
    # A generation step reads nothing: spans, whatever the mask; a row they cannot describe (a hole, or a padded
    # query) gets start > end, which the kernel turns into NaN rather than a wrong answer.
    step = dict(args, **mask_sizes(1, SEQLEN + 1, past=SEQLEN))
    grown = torch.cat([torch.cat([left, right]), torch.ones(4, 1, dtype=torch.bool)], dim=1)
    with HostSyncs() as syncs:
        spans = hf.playground_mask(**dict(step, batch_size=4), attention_mask=grown)
        assert hf.playground_mask(**step) is None
    assert syncs.seen == [] and torch.equal(spans, spans_of([0, 7, 0, 14], [13, 13, 13, 13]))


def test_a_row_with_a_hole_in_a_generation_step_comes_out_nan(device):
    """A right-padded prompt leaves a hole before the new tokens: the step's spans cannot describe it, so paged
    attention returns NaN for that row (exact values for the others), and the varlen path does the same."""
    module = build("llama", device).model.layers[0].self_attn
    mask = torch.tensor([[False, False, True, True, True], [True, True, False, True, True]], device=device)
    spans = hf.playground_mask(batch_size=2, kv_offset=0, attention_mask=mask, device=device, **mask_sizes(1, 5, 4))
    q, k, v = torch.randn(2, 4, 1, 16, device=device), *torch.randn(2, 2, 2, 5, 16, device=device)
    paged, _ = hf.playground_attention(module, q, k, v, spans)
    varlen, _ = hf.playground_attention(module, q.requires_grad_(), k, v, spans)
    alone, _ = hf.playground_attention(module, q[:1], k[:1, :, 2:], v[:1, :, 2:], None)
    for out in (paged, varlen.detach()):
        torch.testing.assert_close(out[:1], alone.detach())
        assert out[1].isnan().all()


def test_a_left_padded_prefill_on_paged_attention_equals_the_varlen_path(device, kernel_calls):
    """Key spans (paged_attention, dense queries, cache_leftpad: no unpadding, no sync) and the padding mask
    (the varlen kernel) give the same real rows, with a window, a cap and sinks; padded queries are 0 in both."""
    module = build("llama", device).model.layers[0].self_attn
    padding = left_padded([9, 4], device, seqlen=9)[1].bool()
    spans = hf.playground_mask(batch_size=2, kv_offset=0, attention_mask=padding, device=device, **mask_sizes(9, 9))
    q, k, v = torch.randn(2, 4, 9, 16, device=device), *torch.randn(2, 2, 2, 9, 16, device=device)
    options = dict(sliding_window=WINDOW, softcap=2.0, s_aux=torch.randn(4, device=device))
    paged, _ = hf.playground_attention(module, q, k, v, spans, **options)
    varlen, _ = hf.playground_attention(module, q, k, v, padding, **options)
    assert kernel_calls == [("paged_attention", 9), ("flash_attention_varlen", None)]
    torch.testing.assert_close(paged, varlen, atol=1e-6, rtol=1e-5)
    assert not paged[1, :5].any(), "padded queries"


def test_4d_masks_the_kernels_cannot_take_are_refused_with_the_reason():
    keep = torch.ones(1, 1, 4, 6, dtype=torch.bool).tril(diagonal=2)
    padding, _ = hf.padding_from_4d(keep, 4, 6, causal=True, window_size=None)
    assert bool(padding.all())
    static = torch.ones(1, 1, 4, 6, dtype=torch.bool).tril()  # queries at positions 0..3 of 6 slots
    assert "not the last Nq keys" in hf.padding_from_4d(static, 4, 6, True, None)[1]
    biased = torch.zeros(1, 1, 4, 6).masked_fill(~keep, float("-inf")) + 0.5
    assert "bias" in hf.padding_from_4d(biased, 4, 6, True, None)[1]
    per_head = keep.expand(1, 2, 4, 6).clone()
    per_head[0, 1, 3, 0] = False
    assert "differs between heads" in hf.padding_from_4d(per_head, 4, 6, True, None)[1]


def test_a_value_head_dim_apart_from_the_query_one_runs_on_the_kernels(device):
    """v_head_dim != head_dim (as in MLA's prefill) with padding, causal and a window: the varlen kernel, no fallback."""
    module = build("llama", device).model.layers[0].self_attn
    q, k = torch.randn(2, 4, 6, 16, device=device), torch.randn(2, 2, 6, 16, device=device)
    v = torch.randn(2, 2, 6, 8, device=device)
    padding = torch.tensor([[True] * 6, [False] * 2 + [True] * 4], device=device)
    hf._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = hf.playground_attention(module, q, k, v, padding, scaling=0.3, sliding_window=3)
    assert not [w for w in caught if hf.NAME in str(w.message)], "no fallback"
    keep = padding[:, None, None, :] & torch.ones(6, 6, dtype=torch.bool, device=device).tril() \
        & torch.ones(6, 6, dtype=torch.bool, device=device).triu(-2)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1),
                                                                v.repeat_interleave(2, 1), attn_mask=keep, scale=0.3)
    real = padding[:, :, None, None].expand(-1, -1, 4, 8)  # (B, N, Hq, D_v): padded queries are garbage anyway
    torch.testing.assert_close(out[real], expected.transpose(1, 2)[real])


# ----------------------------------------------------------------------------
# The hf bench suite
# ----------------------------------------------------------------------------
def test_hf_bench_plans_the_llama_shape_on_a_gpu_and_correctness_rows_on_the_cpu():
    from bench import hf_suite
    from bench.__main__ import build_parser

    args = build_parser().parse_args(["--suite", "hf"])
    cpu, gpu = hf_suite.build_jobs(args, "cpu"), hf_suite.build_jobs(args, "cuda")
    assert cpu and all(j.kind == "check" for j in cpu) and {j.provider for j in cpu} == set(hf_suite.CPU_PROVIDERS)
    timed = [j for j in gpu if j.kind == "time"]
    assert {j.provider for j in timed} == {"eager", "sdpa", "flex_attention", "playground"}
    forward, generate = (next(j.case for j in timed if j.mode == m) for m in ("fwd", "generate"))
    for case in (forward, generate):
        assert (case.layers, case.d_model, case.heads_q, case.heads_kv, case.dtype) == (8, 2048, 16, 4,
                                                                                       torch.bfloat16)
    assert (forward.batch, forward.n) == (1, 4096) and (generate.batch, generate.n) == (8, 256)
    assert hf_suite.build_jobs(build_parser().parse_args(["--suite", "varlen"]), "cpu") == []


def test_hf_bench_check_rows_run_our_kernels_against_float64_eager():
    from bench import hf_suite, sweep
    from bench.plan import Job

    for case in hf_suite.CPU_CHECKS:  # one forward, one generate()
        result = sweep.run_job(Job(hf_suite.SUITE, "check", hf.NAME, case.task, case), torch.device("cpu"), None)
        assert result.status == sweep.CORRECTNESS_ONLY and result.max_err < 1e-5, (case.task, result)
    rows = [dict(suite="hf", kind="time", provider=p, mode="generate", shape="s", batch=8, n=256, time_ms=t,
                 status="ok") for p, t in (("sdpa", 2000.0), (hf.NAME, 1000.0))]
    assert "2048" in hf_suite.summary(rows) and "1024" in hf_suite.summary(rows), "8 x 256 tokens in 1 s and 2 s"


# ----------------------------------------------------------------------------
# torch.compile, and the name clash with Hugging Face's own `kernels` package
# ----------------------------------------------------------------------------
def test_a_compiled_decode_step_on_a_static_cache_runs_our_attention_in_one_graph(device, kernel_calls):
    """fullgraph=True: no graph break anywhere in a Llama decode step of a left-padded batch on transformers'
    StaticCache, the mask function's key spans and paged_attention (a custom op) included; eager's logits.
    (The prefill's flash path compiles in the next test.)"""
    ids, mask, positions = left_padded([6, 3], device, seqlen=6)
    model = build("llama", device)
    cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    step = dict(input_ids=torch.randint(3, VOCAB, (2, 1), device=device), position_ids=positions[:, -1:] + 1,
                attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1))
    results = []
    for implementation in ("eager", hf.NAME):
        model.set_attn_implementation(implementation)
        cache = transformers.StaticCache(config=model.config, max_cache_len=10)
        with torch.no_grad():
            model(ids, attention_mask=mask, position_ids=positions, **{cache_argument: cache})
            forward = model if implementation == "eager" else torch.compile(model, backend="aot_eager",
                                                                            fullgraph=True)
            results.append(forward(**step, **{cache_argument: cache}).logits)
    torch.testing.assert_close(results[1], results[0], atol=2e-5, rtol=1e-5)
    assert ("paged_attention", 1) in kernel_calls


def test_the_attention_function_compiles_with_window_cap_and_sinks_without_a_graph_break(device):
    module = build("llama", device).model.layers[0].self_attn
    q, k, v = (torch.randn(2, h, 8, 16, device=device) for h in (4, 2, 2))
    options = dict(scaling=0.25, sliding_window=WINDOW, softcap=3.0, s_aux=torch.randn(4, device=device))
    compiled = torch.compile(hf.playground_attention, backend="aot_eager", fullgraph=True)
    out, weights = compiled(module, q, k, v, None, **options)
    expected, _ = hf.playground_attention(module, q, k, v, None, **options)
    assert weights is None and out.shape == (2, 8, 4, 16)
    torch.testing.assert_close(out, expected)


def test_transformers_hub_kernels_check_is_not_fooled_by_our_kernels_package():
    """find_spec("kernels") finds ours; transformers then reads the version of the distribution that ships it,
    attention-playground 0.1.0, below its minimum for Hugging Face's `kernels`, and says it is unavailable."""
    import importlib.util

    from transformers.utils import import_utils

    assert Path(importlib.util.find_spec("kernels").origin).parent == Path(kernels.__file__).parent
    assert import_utils.is_kernels_available() is False


def accepted_hub_kernels_version():
    """The lowest version of Hugging Face's `kernels` that this transformers accepts, read from transformers itself.

    transformers 5.x names it (KERNELS_MIN_VERSION, the default of is_kernels_available's MIN_VERSION);
    4.x checks no version, so any will do.
    """
    import inspect

    from transformers.utils import import_utils

    version = getattr(import_utils, "KERNELS_MIN_VERSION", None)
    if version is None:
        minimum = inspect.signature(import_utils.is_kernels_available).parameters.get("MIN_VERSION")
        version = None if minimum is None or minimum.default is inspect.Parameter.empty else minimum.default
    return version or "0.1.0"


def test_with_hugging_faces_kernels_installed_too_the_first_on_sys_path_wins(tmp_path):
    """A stand-in for Hugging Face's `kernels` 0.18.2 (a package and its metadata) on PYTHONPATH. Run from this
    repo's root, ours shadows it and transformers is fooled: it reads their version, imports ours, and its hub
    kernels integration (which every model imports) fails. Run from elsewhere, theirs shadows ours (an editable
    install's finder comes last on sys.meta_path). Hence the README: never install both in one environment.
    The stand-in claims the lowest version this transformers accepts (transformers 5.17 takes 0.16.x, 5.24 0.18.x)."""
    version = accepted_hub_kernels_version()
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("def get_kernel(name):\n    return name\n")
    (tmp_path / f"kernels-{version}.dist-info").mkdir()
    (tmp_path / f"kernels-{version}.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    probe = ("import importlib.util, sys; from transformers.utils.import_utils import is_kernels_available; "
             "print(importlib.util.find_spec('kernels').origin, is_kernels_available())\n"
             "if sys.argv[1] == 'import':\n"
             "    try:\n        import transformers.integrations.hub_kernels\n"
             "    except ImportError as e:\n        print(type(e).__name__)")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    seen = {}
    for where, also in ((REPO, "import"), (elsewhere, "")):
        result = subprocess.run([sys.executable, "-c", probe, also], cwd=where, capture_output=True, text=True,
                                env={"PYTHONPATH": str(tmp_path), "PATH": ""}, timeout=120)
        assert result.returncode == 0, result.stderr
        origin, available, *error = result.stdout.split()
        seen[where] = Path(origin).parent.parent, available, error
    assert seen[REPO] == (REPO, "True", ["ImportError"]), "from the repo root: ours shadows theirs, transformers breaks"
    assert seen[elsewhere] == (tmp_path, "True", []), "elsewhere: theirs shadows ours"
