"""A library of attention patterns, each a MaskMod or ScoreMod around a few lines of Triton.

Each constructor checks its arguments and returns a mod for
`kernels.flash_attention(..., mask_mod=..., score_mod=...)` or for
`create_block_mask` (kernels/block_mask.py says how a mod is written):

    mask mods (True = the query sees the key)
        causal(offset)                   kv <= q + offset
        sliding_window(left, right)      q + offset - left <= kv <= q + offset + right (Mistral: (W - 1, 0))
        prefix_lm(prefix_length)         the first prefix_length keys are seen by every query, the rest causally
        document(doc_ids)                a packed batch: a query sees the keys of its own document
        chunked(chunk_size)              Llama 4: causal inside chunks of chunk_size positions
        bidirectional_spans(span_ids)    Gemma 3: causal, and the tokens of one image see each other
        tree(ancestors, prefix)          speculative decoding: a draft token sees the cache and its ancestors
    score mods (each with its derivative)
        t5_relative_bias(table)          T5's bucketed signed relative position bias, learned (gradient)
        alibi(slopes)                    BLOOM, MPT: - slope * |q + offset - kv| (gradient for the slopes)
        softcap(value)                   Gemma 2: value * tanh(score / value)

A learned dense pair bias (AlphaFold's, a relative-position model's) is not a
mod here: it is `flash_attention(..., attn_bias=bias)`, whose gradient is
written once per score with no atomics and summed over the broadcast dims.

Positions follow FlexAttention: q_idx and kv_idx both count from 0, so Nq != Nk
aligns top-left, as FlexAttention's `q_idx >= kv_idx` does. `offset` places
query i at key position i + offset; FlashAttention's bottom-right alignment,
the one `flash_attention(causal=True)` uses, is offset = Nk - Nq (the queries
are the last Nq positions, as in decoding or chunked prefill). Mods that read
per-position ids (document, bidirectional_spans) read query i's id at
position i + offset of the same array.

The kernels call a mod on whole tiles, padding rows and keys past the
sequences included (create_block_mask's tiles too): every load here is masked
to its tensor's bounds, and whatever a mod says about a padding pair is
masked out afterwards. `reference/mods.py` has the plain PyTorch twin of
each, with the same names; the twins are also FlexAttention mods.

Shapes a mod can only check against the call (doc ids against Nk, a table's
heads against Hq) are checked by `check(batch, heads, n_q, n_k)`, which each
mod built here has; flash_attention does not call it yet (see the tests).
"""
import dataclasses

import torch
import triton
import triton.language as tl

from .block_mask import MaskMod, ScoreMod
from .tiles import UNLIMITED, _tanh


@dataclasses.dataclass(frozen=True, eq=False)
class LibraryMaskMod(MaskMod):
    """A MaskMod of this library: its name and parameters, and the shape check of its tensors."""
    name: str = ""
    params: str = ""
    shape_check: object = None  # (batch, heads, n_q, n_k) -> None, raising ValueError naming the argument

    def check(self, batch, heads, n_q, n_k):
        """Raise ValueError, naming the argument, if this mod's tensors do not fit a call of these sizes."""
        if self.shape_check is not None:
            self.shape_check(batch, heads, n_q, n_k)

    def __repr__(self):
        return f"{self.name}({self.params})"


@dataclasses.dataclass(frozen=True, eq=False)
class LibraryScoreMod(ScoreMod):
    """A ScoreMod of this library (with its derivative): its name and parameters, and its shape check."""
    name: str = ""
    params: str = ""
    shape_check: object = None

    def check(self, batch, heads, n_q, n_k):
        if self.shape_check is not None:
            self.shape_check(batch, heads, n_q, n_k)

    def __repr__(self):
        return f"{self.name}({self.params})"


# ----------------------------------------------------------------------------
# Argument checks: each error names the argument
# ----------------------------------------------------------------------------
def _int(value, name, minimum=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _window_side(value, name):
    """A window side: None (or -1, FlashAttention's spelling) for unlimited, else an int >= 0."""
    if value is None or (not isinstance(value, bool) and isinstance(value, int) and value == -1):
        return UNLIMITED
    return _int(value, name, minimum=0)


def _int_tensor(t, name, dims):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    return t


def _float_tensor(t, name, dims):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    return t


def _per_batch(t):
    """A (N,) or (B, N) tensor as (its batch stride, B or None): a 1-D tensor is shared by the whole batch."""
    return (0, None) if t.dim() == 1 else (t.stride(0), t.shape[0])


def _check_batch(name, rows, batch):
    if rows is not None and rows not in (1, batch):
        raise ValueError(f"{name} has {rows} rows, but the batch has {batch} sequences")


# ----------------------------------------------------------------------------
# Mask mods
# ----------------------------------------------------------------------------
@triton.jit
def _causal(b, h, q_idx, kv_idx, args):
    """args = (offset,): query q_idx sits at key position q_idx + offset and sees the keys up to it."""
    return kv_idx <= q_idx + args[0]


def causal(offset=0):
    """Causal attention: query i sees keys j <= i + offset (offset = Nk - Nq: flash_attention(causal=True))."""
    offset = _int(offset, "offset")
    return LibraryMaskMod(_causal, (offset,), name="causal", params=f"offset={offset}")


@triton.jit
def _sliding_window(b, h, q_idx, kv_idx, args):
    """args = (left, right, offset): keys within [q + offset - left, q + offset + right]."""
    diagonal = q_idx + args[2]
    return (kv_idx >= diagonal - args[0]) & (kv_idx <= diagonal + args[1])


def sliding_window(left, right=0, offset=0):
    """The band q + offset - left <= kv <= q + offset + right: window_size=(left, right) as a mod.

    None (or -1) leaves a side unlimited. Mistral's causal window of W keys is (W - 1, 0).
    """
    left, right = _window_side(left, "left"), _window_side(right, "right")
    offset = _int(offset, "offset")
    shown = ", ".join("None" if s == UNLIMITED else str(s) for s in (left, right))
    return LibraryMaskMod(_sliding_window, (left, right, offset), name="sliding_window",
                          params=f"{shown}, offset={offset}")


@triton.jit
def _prefix_lm(b, h, q_idx, kv_idx, args):
    """args = (prefix_length, offset): the prefix is seen by all; after it, causal."""
    return (kv_idx < args[0]) | (kv_idx <= q_idx + args[1])


@triton.jit
def _prefix_lm_per_batch(b, h, q_idx, kv_idx, args):
    """args = (PREFIX, stride, offset): sequence b's prefix length is PREFIX[b]."""
    prefix = tl.load(args[0] + b * args[1])
    return (kv_idx < prefix) | (kv_idx <= q_idx + args[2])


def prefix_lm(prefix_length, offset=0):
    """Prefix-LM (T5's, PaliGemma's): keys 0 .. prefix_length - 1 are seen by every query, the rest causally.

    prefix_length: an int, or a (B,) integer tensor, one per sequence. (FlexAttention's
    example `kv_idx <= prefix_length[b]` is prefix_lm(prefix_length + 1).)
    """
    offset = _int(offset, "offset")
    if isinstance(prefix_length, torch.Tensor):
        _int_tensor(prefix_length, "prefix_length", (1,))
        rows = prefix_length.shape[0]

        def check(batch, heads, n_q, n_k):
            if rows != batch:
                raise ValueError(f"prefix_length has {rows} entries, but the batch has {batch} sequences")

        return LibraryMaskMod(_prefix_lm_per_batch, (prefix_length, prefix_length.stride(0), offset),
                              name="prefix_lm", params=f"prefix_length=<{rows} lengths>, offset={offset}",
                              shape_check=check)
    prefix_length = _int(prefix_length, "prefix_length", minimum=0)
    return LibraryMaskMod(_prefix_lm, (prefix_length, offset), name="prefix_lm",
                          params=f"prefix_length={prefix_length}, offset={offset}")


@triton.jit
def _same_id(b, q_idx, kv_idx, Q_IDS, KV_IDS, stride_qb, stride_kb, n_q_ids, n_kv_ids, q_shift):
    """Query q_idx's id (at position q_idx + q_shift of Q_IDS) equals key kv_idx's, both inside their arrays."""
    q_pos = q_idx + q_shift
    q_ok = (q_pos >= 0) & (q_pos < n_q_ids)
    kv_ok = kv_idx < n_kv_ids
    q_id = tl.load(Q_IDS + b * stride_qb + q_pos, mask=q_ok, other=0)
    kv_id = tl.load(KV_IDS + b * stride_kb + kv_idx, mask=kv_ok, other=0)
    return (q_id == kv_id) & q_ok & kv_ok


@triton.jit
def _document(b, h, q_idx, kv_idx, args):
    """args = (Q_IDS, KV_IDS, stride_qb, stride_kb, n_q_ids, n_kv_ids, q_shift, offset)."""
    return _same_id(b, q_idx, kv_idx, args[0], args[1], args[2], args[3], args[4], args[5], args[6])


@triton.jit
def _document_causal(b, h, q_idx, kv_idx, args):
    """_document, and causal inside the document."""
    same = _same_id(b, q_idx, kv_idx, args[0], args[1], args[2], args[3], args[4], args[5], args[6])
    return same & (kv_idx <= q_idx + args[7])


def document(doc_ids, kv_doc_ids=None, causal=False, offset=0):
    """Document masking over a packed batch: a query sees only the keys of its own document.

    doc_ids: (N,) or (B, N) integers, the document of each key position; query i's is
    doc_ids[i + offset]. For queries and keys that are different token lists (Nq != Nk
    without one being a suffix of the other) give kv_doc_ids (the keys') too: doc_ids is
    then the queries' (Nq of them) and offset only shifts the causal diagonal.
    causal: also causal inside each document (kv <= q + offset), as in a packed LM batch.
    """
    _int_tensor(doc_ids, "doc_ids", (1, 2))
    offset = _int(offset, "offset")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if kv_doc_ids is None:
        kv_ids, q_shift = doc_ids, offset
    else:
        kv_ids, q_shift = _int_tensor(kv_doc_ids, "kv_doc_ids", (1, 2)), 0
        if kv_ids.dim() == 2 and doc_ids.dim() == 2 and kv_ids.shape[0] != doc_ids.shape[0]:
            raise ValueError(f"doc_ids has {doc_ids.shape[0]} rows but kv_doc_ids has {kv_ids.shape[0]}")
    (stride_qb, rows_q), (stride_kb, rows_k) = _per_batch(doc_ids), _per_batch(kv_ids)
    n_q_ids, n_kv_ids = doc_ids.shape[-1], kv_ids.shape[-1]

    def check(batch, heads, n_q, n_k):
        _check_batch("doc_ids", rows_q, batch)
        _check_batch("kv_doc_ids", rows_k, batch)
        if kv_doc_ids is None:
            if n_kv_ids != n_k:
                raise ValueError(f"doc_ids has {n_kv_ids} positions, but the keys are Nk = {n_k}")
        elif n_q_ids != n_q or n_kv_ids != n_k:
            raise ValueError(f"doc_ids and kv_doc_ids have {n_q_ids} and {n_kv_ids} positions, but "
                             f"(Nq, Nk) = {(n_q, n_k)}")

    fn = _document_causal if causal else _document
    return LibraryMaskMod(fn, (doc_ids, kv_ids, stride_qb, stride_kb, n_q_ids, n_kv_ids, q_shift, offset),
                          name="document", params=f"doc_ids={tuple(doc_ids.shape)}"
                          + ("" if kv_doc_ids is None else f", kv_doc_ids={tuple(kv_ids.shape)}")
                          + f", causal={causal}, offset={offset}", shape_check=check)


@triton.jit
def _chunked(b, h, q_idx, kv_idx, args):
    """args = (chunk_size, offset): causal, and the query's position in the key's chunk."""
    q_pos = q_idx + args[1]
    # Where q_pos < 0 the causal test already fails, so the division's rounding of negatives never matters.
    return (kv_idx <= q_pos) & (q_pos // args[0] == kv_idx // args[0])


def chunked(chunk_size, offset=0):
    """Llama 4's chunked attention: causal inside chunks of chunk_size positions, nothing across them."""
    chunk_size = _int(chunk_size, "chunk_size", minimum=1)
    offset = _int(offset, "offset")
    return LibraryMaskMod(_chunked, (chunk_size, offset), name="chunked",
                          params=f"chunk_size={chunk_size}, offset={offset}")


@triton.jit
def _bidirectional_spans(b, h, q_idx, kv_idx, args):
    """args = (SPANS, stride_b, n, offset): causal, or the same nonzero span id (a position outside SPANS has 0)."""
    q_pos = q_idx + args[3]
    q_span = tl.load(args[0] + b * args[1] + q_pos, mask=(q_pos >= 0) & (q_pos < args[2]), other=0)
    kv_span = tl.load(args[0] + b * args[1] + kv_idx, mask=kv_idx < args[2], other=0)
    return (kv_idx <= q_pos) | ((q_span == kv_span) & (q_span != 0))


def bidirectional_spans(span_ids, offset=0):
    """Gemma 3's image tokens: causal attention, plus every token of a span (one image) sees the whole span.

    span_ids: (N,) or (B, N) integers per key position, 0 for text, k > 0 for the k-th image's tokens;
    query i's span is span_ids[i + offset].
    """
    _int_tensor(span_ids, "span_ids", (1, 2))
    offset = _int(offset, "offset")
    stride_b, rows = _per_batch(span_ids)
    n = span_ids.shape[-1]

    def check(batch, heads, n_q, n_k):
        _check_batch("span_ids", rows, batch)
        if n != n_k:
            raise ValueError(f"span_ids has {n} positions, but the keys are Nk = {n_k}")

    return LibraryMaskMod(_bidirectional_spans, (span_ids, stride_b, n, offset), name="bidirectional_spans",
                          params=f"span_ids={tuple(span_ids.shape)}, offset={offset}", shape_check=check)


@triton.jit
def _tree(b, h, q_idx, kv_idx, args):
    """args = (ANCESTORS, stride_b, stride_i, stride_j, n, prefix): the cache, then the tree's own keys."""
    j = kv_idx - args[5]
    in_tree = (j >= 0) & (j < args[4]) & (q_idx < args[4])
    is_ancestor = tl.load(args[0] + b * args[1] + q_idx * args[2] + j * args[3], mask=in_tree, other=0)
    return (kv_idx < args[5]) | (in_tree & (is_ancestor != 0))


def tree(ancestors, prefix=0):
    """Tree attention for speculative decoding: N draft tokens verified at once.

    ancestors: (N, N) or (B, N, N) bool (or uint8), ancestors[i, j] True when draft token j is
    token i or one of its ancestors. The keys are `prefix` cached tokens, all visible, then the
    N draft tokens (Nk = prefix + N); the queries are the N draft tokens (Nq = N).
    """
    if not isinstance(ancestors, torch.Tensor):
        raise TypeError(f"ancestors must be a torch.Tensor, got {type(ancestors).__name__}")
    if ancestors.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"ancestors must be a bool or uint8 tensor, got {ancestors.dtype}")
    if ancestors.dim() not in (2, 3) or ancestors.shape[-1] != ancestors.shape[-2]:
        raise ValueError(f"ancestors must be (N, N) or (B, N, N), got shape {tuple(ancestors.shape)}")
    prefix = _int(prefix, "prefix", minimum=0)
    n = ancestors.shape[-1]
    stride_b, rows = (0, None) if ancestors.dim() == 2 else (ancestors.stride(0), ancestors.shape[0])

    def check(batch, heads, n_q, n_k):
        _check_batch("ancestors", rows, batch)
        if n_q != n or n_k != prefix + n:
            raise ValueError(f"ancestors is over {n} draft tokens after a prefix of {prefix}: it needs "
                             f"(Nq, Nk) = {(n, prefix + n)}, got {(n_q, n_k)}")

    return LibraryMaskMod(_tree, (ancestors, stride_b, ancestors.stride(-2), ancestors.stride(-1), n, prefix),
                          name="tree", params=f"ancestors={tuple(ancestors.shape)}, prefix={prefix}",
                          shape_check=check)


# ----------------------------------------------------------------------------
# Score mods, each with its derivative
# ----------------------------------------------------------------------------
def t5_bucket_table(bidirectional, num_buckets, max_distance, device=None):
    """T5's bucket of every relative position kv - q in [-max_distance, max_distance]: (2 * max_distance + 1,) int32.

    Positions further away fall in the last bucket of their side, which is also the bucket
    at +-max_distance, so the kernel clamps to this range and looks the bucket up: no log
    in the kernel, and exactly the buckets that reference.mods.t5_bucket computes.
    """
    from reference.mods import t5_bucket

    relative = torch.arange(-max_distance, max_distance + 1, device=device)
    return t5_bucket(relative, bidirectional, num_buckets, max_distance).to(torch.int32)


@triton.jit
def _t5_bucket(q_idx, kv_idx, BUCKETS, max_distance, offset):
    relative = kv_idx - (q_idx + offset)  # T5's memory position minus query position
    relative = tl.minimum(tl.maximum(relative, -max_distance), max_distance)
    return tl.load(BUCKETS + relative + max_distance)


@triton.jit
def _t5_relative_bias(score, b, h, q_idx, kv_idx, args):
    """args = (TABLE, stride_h, stride_bucket, BUCKETS, max_distance, offset, num_buckets): score + TABLE[h, bucket]."""
    bucket = _t5_bucket(q_idx, kv_idx, args[3], args[4], args[5])
    return score + tl.load(args[0] + h * args[1] + bucket * args[2]).to(tl.float32)


@triton.jit
def _t5_relative_bias_bwd(grad, score, b, h, q_idx, kv_idx, args, grad_args, ACCUMULATE: tl.constexpr):
    """d score: grad. d TABLE[h, bucket]: the sum of grad over the pairs in that bucket, one atomic add per pair
    (grad_args[0] is a contiguous (H, num_buckets) fp32 buffer; zeros, the masked pairs, are not sent). On a GPU
    a tile's adds land on a few dozen addresses and queue behind each other: correct, not fast (not measured)."""
    if ACCUMULATE:
        bucket = _t5_bucket(q_idx, kv_idx, args[3], args[4], args[5])
        tl.atomic_add(grad_args[0] + h * args[6] + bucket, grad.to(tl.float32), mask=grad != 0, sem="relaxed")
    return grad


def t5_relative_bias(table, bidirectional=True, num_buckets=None, max_distance=128, offset=0):
    """T5's relative position bias: score + table[h, bucket(kv - q)], learned (table.grad is computed).

    table: (Hq, num_buckets), a float tensor (Hugging Face's relative_attention_bias.weight is
    (num_buckets, Hq): pass its .T). bidirectional: the encoder's buckets (half for keys after
    the query); False: the decoder's (every key after the query in bucket 0). Buckets are exact
    for distances below num_buckets // 2 (// 4 bidirectional) and logarithmic up to
    max_distance. T5 does not scale its scores: call flash_attention with sm_scale=1.0 to match it.
    """
    _float_tensor(table, "table", (2,))
    if not isinstance(bidirectional, bool):
        raise TypeError(f"bidirectional must be a bool, got {type(bidirectional).__name__}")
    num_buckets = table.shape[1] if num_buckets is None else _int(num_buckets, "num_buckets", minimum=2)
    if num_buckets != table.shape[1]:
        raise ValueError(f"table has {table.shape[1]} buckets per head, but num_buckets = {num_buckets}")
    exact = num_buckets // (4 if bidirectional else 2)
    max_distance = _int(max_distance, "max_distance", minimum=1)
    if exact < 1 or max_distance <= exact:
        raise ValueError(f"max_distance ({max_distance}) must exceed the exact buckets ({exact}: num_buckets // "
                         f"{4 if bidirectional else 2}), and num_buckets must leave at least one")
    offset = _int(offset, "offset")
    buckets = t5_bucket_table(bidirectional, num_buckets, max_distance, table.device)
    heads = table.shape[0]

    def check(batch, h, n_q, n_k):
        if heads != h:
            raise ValueError(f"table has {heads} heads, but q has Hq = {h}")

    params = f"table={tuple(table.shape)}, bidirectional={bidirectional}, max_distance={max_distance}, offset={offset}"
    return LibraryScoreMod(_t5_relative_bias, (table, table.stride(0), table.stride(1), buckets, max_distance,
                                               offset, num_buckets), bwd=_t5_relative_bias_bwd,
                           name="t5_relative_bias", params=params, shape_check=check)


@triton.jit
def _alibi_distance(q_idx, kv_idx, offset):
    return tl.abs(q_idx + offset - kv_idx).to(tl.float32)


@triton.jit
def _alibi(score, b, h, q_idx, kv_idx, args):
    """args = (SLOPES, stride_b, stride_h, offset, heads_b): score - SLOPES[b, h] * |q + offset - kv|."""
    slope = tl.load(args[0] + b * args[1] + h * args[2]).to(tl.float32)
    return score - slope * _alibi_distance(q_idx, kv_idx, args[3])


@triton.jit
def _alibi_bwd(grad, score, b, h, q_idx, kv_idx, args, grad_args, ACCUMULATE: tl.constexpr):
    """d score: grad. d slope: -sum(grad * distance) over the tile, one atomic add per tile."""
    if ACCUMULATE:
        contribution = grad.to(tl.float32) * _alibi_distance(q_idx, kv_idx, args[3])
        total = tl.sum(tl.sum(contribution, axis=1), axis=0)
        tl.atomic_add(grad_args[0] + b * args[4] + h, -total, sem="relaxed")
    return grad


def alibi(slopes, offset=0):
    """ALiBi (BLOOM, MPT): score - slope[h] * |q + offset - kv|; offset = Nk - Nq is alibi_slopes= of flash_attention.

    slopes: (Hq,) or (B, Hq) floats. Slopes that require grad get one.
    """
    _float_tensor(slopes, "slopes", (1, 2))
    offset = _int(offset, "offset")
    per_batch = slopes.dim() == 2
    heads = slopes.shape[-1]
    stride_b, stride_h = (slopes.stride(0), slopes.stride(1)) if per_batch else (0, slopes.stride(0))

    def check(batch, h, n_q, n_k):
        if heads != h or (per_batch and slopes.shape[0] != batch):
            raise ValueError(f"slopes must be ({h},) or ({batch}, {h}) for this call, got {tuple(slopes.shape)}")

    return LibraryScoreMod(_alibi, (slopes, stride_b, stride_h, offset, heads if per_batch else 0), bwd=_alibi_bwd,
                           name="alibi", params=f"slopes={tuple(slopes.shape)}, offset={offset}", shape_check=check)


@triton.jit
def _softcap(score, b, h, q_idx, kv_idx, args):
    """args = (value,): value * tanh(score / value)."""
    return args[0] * _tanh(score / args[0])


@triton.jit
def _softcap_bwd(grad, score, b, h, q_idx, kv_idx, args, grad_args, ACCUMULATE: tl.constexpr):
    """d/d score of value * tanh(score / value) = 1 - tanh^2."""
    t = _tanh(score / args[0])
    return grad * (1.0 - t * t)


def softcap(value):
    """Gemma 2's soft-capping, value * tanh(score / value), as a score_mod: flash_attention(softcap=value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"value must be a positive number, got {value!r}")
    return LibraryScoreMod(_softcap, (float(value),), bwd=_softcap_bwd, name="softcap", params=f"{float(value)}")


MASK_MODS = ("causal", "sliding_window", "prefix_lm", "document", "chunked", "bidirectional_spans", "tree")
SCORE_MODS = ("t5_relative_bias", "alibi", "softcap")

__all__ = [*MASK_MODS, *SCORE_MODS, "LibraryMaskMod", "LibraryScoreMod", "t5_bucket_table"]
