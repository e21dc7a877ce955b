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

The mask function (`playground_mask`) runs once per forward (per mask type)
and hands every layer what the kernels can use:
    None                  no padding, every key written: causal (or not) comes from the module
    key spans, (2, B, 1, 1) int32
                          row b's keys are [start, end) = [spans[0, b], spans[1, b]) and its queries
                          the last Nq of them: left padding (start = the pads), a static cache's
                          unwritten slots (end = the written length); paged_attention's cache_leftpad
                          and seqused_k. Four dimensions only so that transformers passes it on untouched
                          (it hands 2-D masks back to the mask function); int32 tells it from masks
    a 2-D (B, L) bool     padding with holes or on the right, True = a real token (flash_attention_2's)
    (S + 1,) int32        packed sequences (position_ids restarting in a row, no mask, no cache):
                          cu_seqlens over the B * N flattened tokens, for the varlen kernel
    a 4-D (B, 1, Nq, Nk)  anything else (chunked attention, custom overlays, a hole under a
                          window), built by transformers' own `sdpa_mask`
A generation step (at most DECODE_MAX_QUERIES queries after cached keys)
reads no device data: the spans are computed on the device, and a row they
cannot describe (a hole in its padding, a padded query: right-padded
prompts) gets start > end, which paged_attention turns into NaN rows rather
than a wrong answer. A prefill with a padding mask reads it once per forward
(a graph break under torch.compile) to pick the cheapest exact form. Only
the two patterns it recognises exactly take these forms: transformers'
causal mask function and its sliding-window causal one (alone or inside
packed sequences). The window itself reaches the kernel through the
`sliding_window` argument every such model passes to its attention function,
as for flash_attention_2:
sliding_window W means query i sees keys i - W + 1 .. i, window_size (W - 1, 0).

The attention function (`playground_attention`) routes each call:
    key spans, or no mask with Nq < Nk      -> kernels.paged_attention over the contiguous cache
      (decode, chunked prefill, a static      (dense queries, cache_leftpad, seqused_k): no host sync
      cache, a left-padded prefill), when
      it is inference and causal
    no mask (prefill, training)             -> kernels.flash_attention
    a padding mask (2-D, spans with
      gradients, or a 4-D mask that is
      exactly causal/window + padding)      -> modules.padding.padded_attention (the varlen kernel)
    packed sequences                        -> kernels.flash_attention_varlen
    sliding_window / softcap / s_aux        -> the kernels' window_size / softcap / sinks options
    dropout (transformers passes 0 in eval) -> the kernels' dropout_p
    any other 4-D mask (documents,          -> kernels.flash_attention's dense-mask path: attn_mask (a block
      prefix-LM, chunked, image tokens)        mask skips hidden key blocks) or, additive, attn_bias
Padded query positions come out as zeros (flash_attention_2 does the same);
eager gives them values that nothing downstream reads.
"""
import warnings

import torch
from transformers import AttentionInterface, masking_utils
from transformers.masking_utils import (
    AttentionMaskInterface,
    and_masks,
    causal_mask_function,
    sdpa_mask,
    sliding_window_overlay,
)

import kernels
from kernels.paged import PAGED_DTYPES

from .padding import padded_attention

NAME = "playground"
DECODE_MAX_QUERIES = 16  # new tokens per cached step up to which it is a generation step: the mask is not read

_AND_MASK_CODE = and_masks(causal_mask_function).__code__
_WINDOW_OVERLAY_CODE = sliding_window_overlay(1).__code__
# Packed sequences: transformers 5 also remaps the positions inside each one, which 4.x does not.
_PACKED = getattr(masking_utils, "packed_sequence_mask_function", None)
_PACKED_SEQUENCE_CODE = _PACKED(None).__code__ if _PACKED is not None else None
_REMAP = getattr(masking_utils, "remap_positions_for_packed_sequence", None)
_REMAP_CODE = _REMAP(causal_mask_function, None).__code__ if _REMAP is not None else None
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


def _packed_sequence_ids(mask_function):
    """(sequence ids (B, N), inner mask function) if mask_function is transformers' packed-sequence mask, else None.

    transformers builds it when position_ids restart inside a row and there is no
    attention mask and no cache: and_masks(remap_positions_for_packed_sequence(inner,
    position_ids), packed_sequence_mask_function(ids)) (4.x: without the remap).
    """
    if getattr(mask_function, "__code__", None) is not _AND_MASK_CODE:
        return None
    parts = _closure(mask_function).get("mask_functions")
    if not (isinstance(parts, tuple) and len(parts) == 2 and _PACKED_SEQUENCE_CODE is not None
            and getattr(parts[1], "__code__", None) is _PACKED_SEQUENCE_CODE):
        return None
    inner = parts[0]
    if _REMAP_CODE is not None and getattr(inner, "__code__", None) is _REMAP_CODE:
        inner = _closure(inner).get("mask_function")
    return _closure(parts[1]).get("packed_sequence_mask"), inner


def _is_causal_pattern(mask_function, local_size):
    """True for transformers' causal mask function and its sliding-window causal one (of the model's window)."""
    window = _window_of(mask_function)
    return mask_function is causal_mask_function or (window is not None and window == (local_size or window))


def _cu_seqlens_of(sequence_ids):
    """(S + 1,) int32 offsets of the S packed sequences of the flattened (B * N) tokens: one read (nonzero).

    A sequence starts at each row's first token and wherever the id changes, so none crosses a row.
    """
    starts = torch.ones_like(sequence_ids, dtype=torch.bool)
    starts[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    starts = starts.flatten().nonzero().flatten()
    return torch.cat([starts, starts.new_full((1,), sequence_ids.numel())]).to(torch.int32)


def _query_extent(kv_length, kv_offset, kwargs):
    """(Nq, end): the queries are keys [end - Nq, end) of this layer's kv_length.

    end is an int, or a device tensor for a static cache (transformers 5 passes its
    q_offset as one, 4.x a cache_position): never read here.
    """
    if "q_length" in kwargs:
        n_q = kwargs["q_length"]
        return n_q, kwargs.get("q_offset", 0) + n_q - kv_offset
    if kwargs.get("cache_position") is not None:
        positions = kwargs["cache_position"]
        return positions.shape[0], positions[-1] + 1 - kv_offset
    return kv_length, kv_length


def _key_spans(padding, end, batch, device):
    """(2, B, 1, 1) int32: where each row's keys start ([0], cache_leftpad) and end ([1], seqused_k). No read.

    Four dimensions because transformers hands a 2-D mask back to the mask
    function (generate() builds a static cache's masks ahead, then the model
    again) but passes a 4-D one through untouched; int32 tells them from masks.

    padding: (B, L) bool (True = a real token) or None; end: the queries' end,
    an int or a device tensor. The real keys must be exactly [start, end): left
    padding, the queries last. A row with a hole, or with padding among its
    queries, gets start = end + 1, which the kernel turns into NaN rows: the
    answer it cannot give is never silently wrong.
    """
    if isinstance(end, int):
        end = torch.full((batch,), end, dtype=torch.int32, device=device)
    else:
        end = end.to(device=device, dtype=torch.int32).expand(batch)
    if padding is None:
        return torch.stack([torch.zeros_like(end), end])[:, :, None, None]
    columns = torch.arange(padding.shape[1], device=device)
    real = padding & (columns < end[:, None])  # (B, L): a static cache's full-length mask may cover unwritten slots
    start = end - real.sum(dim=1, dtype=torch.int32)
    expected = (columns >= start[:, None]) & (columns < end[:, None])
    start = torch.where((real == expected).all(dim=1), start, end + 1)
    return torch.stack([start, end])[:, :, None, None]


def _one_run(padding):
    """0-d bool tensor: every row's real tokens form one run (left or right padding, no holes)."""
    positions = torch.arange(padding.shape[1], device=padding.device)
    first = torch.where(padding, positions, padding.shape[1]).amin(dim=1)
    last = torch.where(padding, positions, -1).amax(dim=1)
    lengths = padding.sum(dim=1)
    return ((lengths == last - first + 1) | (lengths == 0)).all()


def playground_mask(batch_size, kv_length, kv_offset=0, mask_function=causal_mask_function, attention_mask=None,
                    local_size=None, **kwargs):
    """transformers' mask for NAME: None, key spans, a 2-D padding mask, packed offsets, or sdpa_mask's 4-D mask.

    A generation step (at most DECODE_MAX_QUERIES queries after cached keys)
    reads nothing: its padding becomes key spans on the device. A prefill with
    a padding mask reads it once per forward (not once per layer) to choose the
    cheapest form that is exact.
    """
    packed = _packed_sequence_ids(mask_function)
    if packed is not None and attention_mask is None and _is_causal_pattern(packed[1], local_size):
        return _cu_seqlens_of(packed[0])  # one read per forward: packing is a training path
    window = _window_of(mask_function)
    if _is_causal_pattern(mask_function, local_size):
        device = kwargs.get("device") if attention_mask is None else attention_mask.device
        n_q, end = _query_extent(kv_length, kv_offset, kwargs)
        if attention_mask is None:
            return None if isinstance(end, int) and end == kv_length else _key_spans(None, end, batch_size, device)
        padding = attention_mask[:, -kv_length:].bool()  # a sliding-window cache holds only the last kv_length keys
        if n_q <= DECODE_MAX_QUERIES and kv_length > n_q:  # a generation step: no read
            return _key_spans(padding, end, batch_size, device)
        end = int(end)  # a prefill: one read per forward (a graph break under torch.compile)
        padding = padding[:, :end]
        spans = _key_spans(padding, end, batch_size, device)
        all_real, left_padded, one_run = torch.stack(
            [padding.all(), (spans[0] <= spans[1]).all(), _one_run(padding)]).tolist()
        if all_real and end == kv_length:
            return None
        if left_padded:
            return spans
        if window is None or one_run:  # a hole in a row would shift the window's positions
            return padding
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
# ----------------------------------------------------------------------------
# The attention function
# ----------------------------------------------------------------------------
def _any_4d_mask(query, key, value, mask, scaling, options):
    """A 4-D mask that is no causal/window/padding pattern (document masks, prefix-LM, chunked attention,
    bidirectional image tokens, ...) on the kernels' dense-mask path: a bool mask as attn_mask (its all-hidden
    key blocks are never loaded), an additive one as attn_bias (eager's exact scores, its gradient included).
    The mask already holds causality and any window. (B, Hq, Nq, D) -> (B, Nq, Hq, D)."""
    masks = {"attn_mask": mask} if mask.dtype == torch.bool else {"attn_bias": mask}
    out = kernels.flash_attention(query, key, value, sm_scale=scaling, **masks, **options)
    return out.transpose(1, 2).contiguous()


def _window_size(sliding_window, causal):
    """transformers' sliding_window W as the kernels' (left, right), after masking_utils' overlays."""
    if sliding_window is None:
        return None
    # causal: key j visible iff j > i - W, so W - 1 keys to the left; bidirectional: |i - j| <= W
    return (sliding_window - 1, 0) if causal else (sliding_window, sliding_window)


def _spans_to_padding(spans, n_k):
    """Key spans (2, B) as a (B, Nk) padding mask, and the rows they mark as inexpressible (start > end)."""
    columns = torch.arange(n_k, device=spans.device)
    return (columns >= spans[0, :, None]) & (columns < spans[1, :, None]), spans[0] > spans[1]


def _packed_attention(query, key, value, cu_seqlens, causal, scaling, window_size, options):
    """Sequences packed in rows (position_ids restarting) on the varlen kernel: (B, Hq, N, D) -> (B, N, Hq, D)."""
    batch, h_q, n, head_dim = query.shape
    # (B, H, N, D) -> (B, N, H, D) -> (B * N, H, D): the rows are the flattened tokens cu_seqlens counts
    q, k, v = (t.transpose(1, 2).reshape(batch * n, t.shape[1], head_dim) for t in (query, key, value))
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # a read per layer: packing is a training path
    out = kernels.flash_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, longest, longest, causal=causal,
                                         sm_scale=scaling, window_size=window_size, **options)
    return out.view(batch, n, h_q, head_dim)


def _paged_ok(query, key, value, causal, options):
    """paged_attention can take this call: causal, inference, no dropout, a dtype and head dim it has."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return (causal and not needs_grad and "dropout_p" not in options and query.dtype in PAGED_DTYPES
            and value.shape[-1] == query.shape[-1] and query.shape[2] <= key.shape[2])


def playground_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                         softcap=None, s_aux=None, **kwargs):
    """transformers' attention on our kernels: q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D) -> ((B, Nq, Hq, D), None).

    attention_mask is what `playground_mask` built (None, (2, B, 1, 1) int32 key spans,
    a (B, L) bool padding mask, (S + 1,) int32 packed offsets, or 4-D), or a
    4-D mask a caller passed; causal comes from `is_causal` when given, else
    from the module. Nothing here reads device data, except the varlen paths
    (unpadding; packed sequences' longest length) and a 4-D mask's reduction.
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
    mask = attention_mask
    if mask is not None and mask.dim() == 1:  # packed sequences
        return _packed_attention(query, key, value, mask, causal, scaling, window_size, options), None

    paged = _paged_ok(query, key, value, causal, options)
    spans = mask.view(2, -1) if mask is not None and mask.dtype == torch.int32 else None  # (2, B, 1, 1) -> (2, B)
    if spans is None and mask is None and paged and query.shape[2] < key.shape[2]:
        # A cached step with every key real (decode, chunked prefill): the whole cache.
        spans = _key_spans(None, key.shape[2], query.shape[0], query.device).view(2, -1)
    if spans is not None and paged:
        out = kernels.paged_attention(query, key, value, spans[1], cache_leftpad=spans[0], causal=True,
                                      sm_scale=scaling, window_size=window_size, softcap=softcap or None,
                                      sinks=sinks)
        # (B, Hq, Nq, D) -> (B, Nq, Hq, D), the layout transformers reshapes to (B, Nq, Hq * D)
        return out.transpose(1, 2).contiguous(), None

    padding, inexpressible = mask, None
    if spans is not None:  # gradients, dropout or non-causal: the varlen path, on the same keys
        padding, inexpressible = _spans_to_padding(spans, key.shape[2])
    elif mask is not None and mask.dim() == 2:
        length = mask.shape[1]
        key, value = key[:, :, :length], value[:, :, :length]  # a static cache's unwritten slots
        padding = mask.bool()
    elif mask is not None:
        padding, reason = padding_from_4d(mask, query.shape[2], key.shape[2], causal, window_size)
        if padding is None:  # any other pattern: the kernels' dense-mask path (a block mask skips hidden blocks)
            return _any_4d_mask(query, key, value, mask, scaling, options), None
        padding = None if bool(padding.all()) else padding.expand(query.shape[0], -1)

    if padding is not None:
        out = padded_attention(query, key, value, padding, causal=causal, sm_scale=scaling,
                               window_size=window_size, **options)
    else:
        out = kernels.flash_attention(query, key, value, causal=causal, sm_scale=scaling, window_size=window_size,
                                      **options)
    if inexpressible is not None:  # what the kernels turn to NaN on the paged path, so here too
        out = out.masked_fill(inexpressible[:, None, None, None], float("nan"))
    return out.transpose(1, 2).contiguous(), None
