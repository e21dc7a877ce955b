"""Hugging Face transformers on our kernels: `attn_implementation="playground"`.

    import modules.hf
    modules.hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="playground")

transformers calls one attention function per layer through its public hook,
`transformers.AttentionInterface`, with the layer's query (B, Hq, N, D), its
key and value (B, Hkv, Nk, D) from the cache, the scaling, the mask, and
where a model has them `sliding_window`, `softcap` and `s_aux` (gpt-oss's
sinks). Which mask it passes is decided by a second hook,
`transformers.masking_utils.AttentionMaskInterface`: without an entry there
the function receives no mask at all and a padded batch silently attends to
its padding. `register()` fills both hooks.

The mask function (`playground_mask`) hands the kernels what they can use:
    None                 no padding: causal (or not) comes from the module
    a 2-D (B, L) bool    padding, True = a real token, as flash_attention_2's;
                         L < Nk for a static cache, whose slots past L are unwritten
    a 4-D (B, 1, Nq, Nk) anything else (chunked, packed sequences, custom
                         overlays), built by transformers' own `sdpa_mask`
It returns a padding mask only for the two patterns it recognises exactly:
transformers' causal mask function and its sliding-window causal one (with
a window, only when each row's real tokens are contiguous: packing the
tokens around a hole would shift the window's positions). The
window itself reaches the kernel through the `sliding_window` argument every
such model passes to its attention function, as for flash_attention_2:
sliding_window W means query i sees keys i - W + 1 .. i, window_size (W - 1, 0).

The attention function (`playground_attention`) routes each call:
    decode step (Nq <= 16 new tokens on a cache, no padding,
      nothing but causal)                   -> kernels.decode_attention when this build has it
    no mask (prefill, training, decode)     -> kernels.flash_attention
    a padding mask (2-D, or a 4-D mask that
      is exactly causal/window + padding)   -> modules.padding.padded_attention (the varlen kernel)
    sliding_window / softcap / s_aux        -> the kernels' window_size / softcap / sinks options
    dropout (transformers passes 0 in eval) -> the kernels' dropout_p
    anything the kernels cannot express     -> SDPA (or, with softcap or sinks, which SDPA lacks,
      (another 4-D mask, v_head_dim != D)      plain dense math), with a one-time warning naming why
Padded query positions come out as zeros (flash_attention_2 does the same);
eager gives them values that nothing downstream reads.
"""
import warnings

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    and_masks,
    causal_mask_function,
    sdpa_mask,
    sliding_window_overlay,
)

import kernels
from reference.functional import causal_visibility, window_visibility

from .padding import padded_attention

NAME = "playground"
DECODE_MAX_QUERIES = 16  # new tokens per step up to which a cached step goes to decode_attention
# Dense math masks with the most negative fp32, as eager does, not -inf: a fully masked (padding) row
# then averages its values instead of turning NaN and spreading through the next layer's values.
MASKED = torch.finfo(torch.float32).min

_AND_MASK_CODE = and_masks(causal_mask_function).__code__
_WINDOW_OVERLAY_CODE = sliding_window_overlay(1).__code__
_warned = set()


def register() -> str:
    """Make `attn_implementation="playground"` (NAME) available to every transformers model; safe to call again."""
    AttentionInterface.register(NAME, playground_attention)
    AttentionMaskInterface.register(NAME, playground_mask)
    return NAME


def _warn_once(reason: str):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"attn_implementation={NAME!r}: {reason}", stacklevel=3)


# ----------------------------------------------------------------------------
# The mask: what transformers builds for this implementation
# ----------------------------------------------------------------------------
def _closure(function):
    """A function's free variables by name ({} for one without)."""
    cells = getattr(function, "__closure__", None) or ()
    return dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in cells)))


def _window_of(mask_function):
    """W if mask_function is transformers' sliding_window_causal_mask_function(W), else None."""
    if getattr(mask_function, "__code__", None) is not _AND_MASK_CODE:
        return None
    parts = _closure(mask_function).get("mask_functions")  # and_masks(*mask_functions)
    if not (isinstance(parts, tuple) and len(parts) == 2 and parts[1] is causal_mask_function
            and getattr(parts[0], "__code__", None) is _WINDOW_OVERLAY_CODE):
        return None
    return _closure(parts[0]).get("sliding_window")


def _is_contiguous(padding_mask):
    """True when every row's real tokens form one run (left or right padding, no holes)."""
    positions = torch.arange(padding_mask.shape[1], device=padding_mask.device)
    first = torch.where(padding_mask, positions, padding_mask.shape[1]).amin(dim=1)
    last = torch.where(padding_mask, positions, -1).amax(dim=1)
    lengths = padding_mask.sum(dim=1)
    return bool(((lengths == last - first + 1) | (lengths == 0)).all())


def _unwritten_slots(kv_offset, kv_length, kwargs):
    """How many keys lie past the last query (a static cache's empty slots); 0 without reading a tensor when
    the queries are as many as the keys. transformers 5 passes q_offset and q_length, 4.x cache_position."""
    if "q_length" in kwargs:
        n_q, end = kwargs["q_length"], kwargs.get("q_offset", 0) + kwargs["q_length"]
    elif kwargs.get("cache_position") is not None:
        n_q, end = kwargs["cache_position"].shape[0], kwargs["cache_position"][-1] + 1
    else:
        return 0
    return 0 if n_q >= kv_length else max(0, kv_offset + kv_length - int(end))


def playground_mask(batch_size, kv_length, kv_offset=0, mask_function=causal_mask_function, attention_mask=None,
                    local_size=None, **kwargs):
    """transformers' mask for NAME: None, a 2-D padding mask, or (for other patterns) sdpa_mask's 4-D bool mask."""
    window = _window_of(mask_function)
    recognised = mask_function is causal_mask_function or (window is not None and window == (local_size or window))
    if recognised and attention_mask is None:
        unwritten = _unwritten_slots(kv_offset, kv_length, kwargs)
        if not unwritten:
            return None
        # Bottom-right causal would align the queries with the end of the cache: say which keys are real.
        return torch.ones(batch_size, kv_length - unwritten, dtype=torch.bool, device=kwargs.get("device"))
    if recognised:
        padding = attention_mask[:, -kv_length:]  # a sliding-window cache holds only the last kv_length keys
        if window is None or _is_contiguous(padding):  # a hole in a row would shift the window's positions
            return None if padding.shape[1] == kv_length and bool(padding.all()) else padding
    for skip in ("allow_is_causal_skip", "allow_is_bidirectional_skip"):
        kwargs.pop(skip, None)
    return sdpa_mask(batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, local_size=local_size, allow_is_causal_skip=False,
                     allow_is_bidirectional_skip=False, **kwargs)


# ----------------------------------------------------------------------------
# 4-D masks: reduce exactly to padding, or say why not
# ----------------------------------------------------------------------------
def varlen_visibility(padding, n_q, causal, window_size):
    """What padded_attention lets each query see, (B, Nq, Nk) bool, for a (B, Nk) padding mask.

    The queries are the last Nq positions. Packed, key j is the rank_j-th real
    key; a real query at position p sits on the packed diagonal rank_p (its
    own rank among the keys), so causal means rank_j <= rank_p and a window
    (left, right) rank_p - left <= rank_j <= rank_p + right.
    """
    rank = padding.long().cumsum(dim=1) - 1  # (B, Nk)
    diagonal = rank[:, -n_q:, None]  # (B, Nq, 1)
    keys = rank[:, None, :]  # (B, 1, Nk)
    visible = padding[:, None, :].expand(-1, n_q, -1)
    left, right = window_size if window_size is not None else (None, None)
    if causal:
        visible = visible & (keys <= diagonal)
    elif right is not None:
        visible = visible & (keys <= diagonal + right)
    if left is not None:
        visible = visible & (keys >= diagonal - left)
    return visible


def padding_from_4d(mask, n_q, n_k, causal, window_size):
    """(padding (B, Nk) bool, "") if the 4-D mask is exactly causal/window + padding for the kernels; else (None, why).

    A bool mask keeps True; an additive float mask keeps 0 and drops its
    most negative values (transformers' finfo.min, or -inf); any other value
    is a bias the kernels do not take. A key that no query may see is padding;
    a query whose position is padding outputs 0.
    """
    if mask.dim() != 4 or mask.shape[-2:] != (n_q, n_k):
        return None, f"a mask of shape {tuple(mask.shape)} is not (B, 1, {n_q}, {n_k})"
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask == 0
        if not bool((keep | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
            return None, "an additive 4-D mask with values other than 0 and -inf (a bias)"
    if keep.shape[1] != 1 and not bool((keep == keep[:, :1]).all()):
        return None, "a 4-D mask that differs between heads"
    keep = keep[:, 0]  # (B, Nq, Nk)
    queries = torch.arange(n_q, device=mask.device)
    sees_itself = keep[:, queries, n_k - n_q + queries]  # (B, Nq): query i sits at key position Nk - Nq + i
    if causal and not torch.equal(keep.any(dim=2), sees_itself):
        return None, "a 4-D mask whose queries are not the last Nq keys, each seeing itself (a static cache?)"
    padding = keep.any(dim=1)  # (B, Nk): the keys some query may see
    real_queries = padding[:, -n_q:]
    expected = varlen_visibility(padding, n_q, causal, window_size)
    if not torch.equal(expected[real_queries], keep.expand_as(expected)[real_queries]):
        return None, "a 4-D mask that is not causal/sliding-window attention over a padding mask"
    return padding, ""


# ----------------------------------------------------------------------------
# Fallback: what the kernels cannot express
# ----------------------------------------------------------------------------
def _dense_attention(module, query, key, value, mask, scaling, dropout, softcap, sinks):
    """Eager-style math with a mask, for softcap and sinks, which SDPA lacks. (B, Hq, Nq, D) -> (B, Nq, Hq, D)."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = (query @ key.transpose(-2, -1)).float() * scaling  # (B, Hq, Nq, Nk)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, MASKED) if mask.dtype == torch.bool else scores + mask.float()
    if sinks is not None:
        # (Hq,) -> (B, Hq, Nq, 1): a column that joins the normaliser and is dropped after the softmax
        scores = torch.cat([scores, sinks.float()[None, :, None, None].expand(*scores.shape[:3], 1)], dim=-1)
    weights = torch.softmax(scores, dim=-1)
    weights = weights[..., :-1] if sinks is not None else weights
    weights = F.dropout(weights, p=dropout, training=dropout > 0).to(value.dtype)
    return (weights @ value).transpose(1, 2).contiguous()


def _fallback(reason, module, query, key, value, mask, scaling, dropout, causal, window_size, softcap, sinks,
              kwargs):
    """The attention SDPA (or dense math) computes, with a warning naming the reason, once per reason.

    mask: a 4-D mask, or the kernels' (B, Nk) padding (or None), which becomes the eager
    (B, 1, Nq, Nk) mask: padding, causal and window by absolute position.
    """
    if mask is None or mask.dim() == 2:
        n_q, n_k = query.shape[2], key.shape[2]
        visible = causal_visibility(n_q, n_k, query.device) if causal else None
        if window_size is not None:
            window = window_visibility(n_q, n_k, window_size, query.device)
            visible = window if visible is None else visible & window
        if mask is not None:
            padding = mask[:, None, None, :]  # (B, Nk) -> (B, 1, 1, Nk)
            visible = padding if visible is None else padding & visible
        mask = visible
    lacking = [name for name, value_ in (("softcap", softcap), ("sinks", sinks)) if value_ is not None]
    if lacking:
        _warn_once(f"{reason}: the kernels cannot express it, and SDPA has no {' or '.join(lacking)}; "
                   "computing this attention with dense math")
        return _dense_attention(module, query, key, value, mask, scaling, dropout, softcap, sinks), None
    _warn_once(f"{reason}: the kernels cannot express it; falling back to SDPA")
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=causal and mask is None, **kwargs)


# ----------------------------------------------------------------------------
# The attention function
# ----------------------------------------------------------------------------
def _window_size(sliding_window, causal):
    """transformers' sliding_window W as the kernels' (left, right), after masking_utils' overlays."""
    if sliding_window is None:
        return None
    # causal: key j visible iff j > i - W, so W - 1 keys to the left; bidirectional: |i - j| <= W
    return (sliding_window - 1, 0) if causal else (sliding_window, sliding_window)


def _is_decode_step(query, key, causal, window_size, options):
    n_q, n_k = query.shape[2], key.shape[2]
    window_cuts = window_size is not None and window_size[0] < n_k - 1
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key))
    return (causal and n_q <= DECODE_MAX_QUERIES and n_q < n_k
            and not window_cuts and not options and not needs_grad)


def playground_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                         softcap=None, s_aux=None, **kwargs):
    """transformers' attention on our kernels: q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D) -> ((B, Nq, Hq, D), None).

    attention_mask is what `playground_mask` built (None, (B, L) padding, or
    4-D), or a 4-D mask a caller passed; causal comes from `is_causal` when
    given, else from the module.
    """
    is_causal = kwargs.pop("is_causal", None)
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if kwargs.get("output_attentions", False):
        _warn_once("output_attentions=True is not supported (no weights are materialised); returning None")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    window_size = _window_size(sliding_window, causal)
    sinks = s_aux.float() if s_aux is not None else None  # the kernels take fp32 sinks; the cast passes gradients
    options = {name: value_ for name, value_ in (("softcap", softcap or None), ("sinks", sinks),
                                                ("dropout_p", dropout or None)) if value_ is not None}
    padding = attention_mask
    if attention_mask is not None and attention_mask.dim() == 2:
        length = attention_mask.shape[1]
        key, value = key[:, :, :length], value[:, :, :length]  # a static cache's unwritten slots
        padding = attention_mask.bool()
    elif attention_mask is not None:
        padding, reason = padding_from_4d(attention_mask, query.shape[2], key.shape[2], causal, window_size)
        if padding is None:
            return _fallback(reason, module, query, key, value, attention_mask, scaling, dropout, causal,
                             window_size, softcap, sinks, kwargs)
        padding = None if bool(padding.all()) else padding.expand(query.shape[0], -1)
    if value.shape[-1] != query.shape[-1]:
        return _fallback(f"value head dim {value.shape[-1]} != query head dim {query.shape[-1]}", module, query, key,
                         value, padding, scaling, dropout, causal, window_size, softcap, sinks, kwargs)

    if padding is not None:
        out = padded_attention(query, key, value, padding, causal=causal, sm_scale=scaling,
                               window_size=window_size, **options)
    elif _is_decode_step(query, key, causal, window_size, options):
        cache_seqlens = torch.full((query.shape[0],), key.shape[2], dtype=torch.int32, device=query.device)
        out = kernels.decode_attention(query, key.contiguous(), value.contiguous(), cache_seqlens, causal=True,
                                       sm_scale=scaling)
    else:
        out = kernels.flash_attention(query, key, value, causal=causal, sm_scale=scaling, window_size=window_size,
                                      **options)
    # (B, Hq, Nq, D) -> (B, Nq, Hq, D), the layout transformers reshapes to (B, Nq, Hq * D)
    return out.transpose(1, 2).contiguous(), None
