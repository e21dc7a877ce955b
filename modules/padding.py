"""Padded batches through the varlen path: unpad, attend, pad back.

A batch of sequences of different lengths is usually padded to the longest
one, with a (B, N) mask saying which tokens are real. Attention on the
padded batch spends (B * N_max)^2-ish work on padding and must mask padded
keys. Packing the real tokens one sequence after another instead, with
cu_seqlens marking where each starts, lets `flash_attention_varlen` do only
the real work. FlashAttention's `bert_padding` has the same idea; these are
our own few lines:

    unpad_input(x, attention_mask)   (B, N, ...) -> (total, ...), indices, cu_seqlens, max_seqlen
    pad_input(x, indices, B, N)      (total, ...) -> (B, N, ...), zeros at the padding
    padded_attention(q, k, v, attention_mask, causal, **options)
                                     (B, H, N, D) in, (B, H, N, D) out, zeros at padded queries

Left and right padding both work: only which positions are real matters,
and a sequence's real tokens keep their order.

Host syncs: unpadding reads the mask (`nonzero`: the packed size is data), so
padded_attention makes one read per distinct mask (one in a prefill, where
queries and keys share it; two in a decoding step), and bounds the longest
sequence by the padded width instead of reading it. flash_attention_varlen's
own input check reads cu_seqlens in eager mode. A left-padded batch avoids all
of it on kernels.paged_attention (cache_leftpad), as modules/hf.py does.
"""
import torch
import torch.nn.functional as F

from reference.functional import naive_attention_varlen

PADDED_BACKENDS = ("triton", "naive")


def check_attention_mask(attention_mask, batch, seqlen, name="attention_mask"):
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = a real token), got {attention_mask.dtype}")
    if attention_mask.shape != (batch, seqlen):
        raise ValueError(f"{name} must have shape (batch, tokens) = {(batch, seqlen)}, "
                         f"got {tuple(attention_mask.shape)}")


def unpad_input(x, attention_mask):
    """The real tokens of a padded batch, packed: x (B, N, ...) with a (B, N) bool mask, True = real.

    Returns x_unpadded (total, ...), the real tokens in order, sequence after
    sequence; indices (total,) int64, their positions in the flattened B * N;
    cu_seqlens (B + 1,) int32, the prefix sums of the lengths, from 0; and
    max_seqlen, the longest length as a Python int.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor of shape (batch, tokens, ...), got {getattr(x, 'shape', type(x))}")
    check_attention_mask(attention_mask, x.shape[0], x.shape[1])
    indices, cu_seqlens = _unpad_indices(attention_mask)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if attention_mask.shape[0] else 0
    # (B, N, ...) -> (B * N, ...) -> (total, ...)
    return x.flatten(0, 1)[indices], indices, cu_seqlens, max_seqlen


def _unpad_indices(attention_mask):
    """The real tokens' positions in the flattened (B * N), (total,) int64, and cu_seqlens (B + 1,) int32.

    One read: nonzero's output size is the number of real tokens.
    """
    seqlens = attention_mask.sum(dim=1, dtype=torch.int32)  # (B,)
    indices = attention_mask.flatten().nonzero().flatten()  # row-major: sequence by sequence, in order
    return indices, F.pad(seqlens.cumsum(dim=0, dtype=torch.int32), (1, 0))  # (B,) -> (B + 1,), starting at 0


def pad_input(x_unpadded, indices, batch, seqlen):
    """unpad_input's inverse: (total, ...) -> (batch, seqlen, ...), zeros where no index points."""
    if indices.shape != (x_unpadded.shape[0],):
        raise ValueError(f"indices must have shape ({x_unpadded.shape[0]},), one per row of x_unpadded, "
                         f"got {tuple(indices.shape)}")
    out = x_unpadded.new_zeros(batch * seqlen, *x_unpadded.shape[1:])
    # (total, ...) -> (B * N, ...) -> (B, N, ...); index_copy is differentiable in x_unpadded
    return out.index_copy(0, indices, x_unpadded).view(batch, seqlen, *x_unpadded.shape[1:])


def padded_attention(q, k, v, attention_mask, causal=False, backend="triton", **options):
    """Attention on a padded batch, computed on its real tokens only.

    q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D); attention_mask (B, Nk) bool,
    True = a real token. The queries are the last Nq positions (Nq = Nk in a
    prefill; Nq < Nk when decoding with a left-padded cache, as in Hugging
    Face), so their mask is attention_mask[:, -Nq:]. Padded keys are never
    seen; padded queries output 0. causal is bottom-right within each
    sequence's real tokens. options: flash_attention_varlen's (window_size,
    softcap, alibi_slopes, sinks, dropout_p, ...), except return_lse.

    backend "triton" runs kernels.flash_attention_varlen; "naive" the
    reference `naive_attention_varlen` (float64-able, for tests).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a tensor of shape (batch, heads, tokens, head_dim), "
                             f"got {getattr(t, 'shape', type(t))}")
    if backend not in PADDED_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, PADDED_BACKENDS))}; got {backend!r}")
    if "return_lse" in options:
        raise TypeError("padded_attention returns the output only; return_lse is not supported")
    if backend == "naive" and options.get("dropout_p", 0.0) > 0:
        raise ValueError("backend='naive' draws no dropout mask: pass dropout_p to backend='triton'")
    batch, _, n_q, _ = q.shape
    n_k = k.shape[2]
    check_attention_mask(attention_mask, batch, n_k)
    if n_q > n_k:
        raise ValueError(f"q has {n_q} tokens but k only {n_k}: the queries must be the last Nq of the Nk positions")
    k_indices, cu_seqlens_k = _unpad_indices(attention_mask)
    q_indices, cu_seqlens_q = (k_indices, cu_seqlens_k) if n_q == n_k else _unpad_indices(attention_mask[:, -n_q:])
    # (B, H, N, D) -> (B, N, H, D) -> (B * N, H, D) -> (total, H, D)
    q_packed, k_packed, v_packed = (t.transpose(1, 2).flatten(0, 1)[indices] for t, indices in (
        (q, q_indices), (k, k_indices), (v, k_indices)))
    if backend == "triton":
        from kernels import flash_attention_varlen

        # The padded widths bound the lengths: no read (a longer bound only adds programs that exit at once).
        out = flash_attention_varlen(q_packed, k_packed, v_packed, cu_seqlens_q, cu_seqlens_k, n_q, n_k,
                                     causal=causal, **options)
    else:
        out = naive_attention_varlen(q_packed, k_packed, v_packed, cu_seqlens_q, cu_seqlens_k, causal=causal,
                                     **options)
    # (total, Hq, D) -> (B, Nq, Hq, D) -> (B, Hq, Nq, D)
    return pad_input(out, q_indices, batch, n_q).transpose(1, 2)
