"""Twins of reference/model_variants.py: sliding window, soft-capping and sinks on a chosen backend.

As in modules/attention.py, each twin subclasses its reference and replaces
`attend` only, so parameters (the sinks included), buffers and state_dict
are the reference's own. The options come from the reference's
`attention_options()`, the keyword arguments of both `naive_attention` and
`kernels.flash_attention`:

    "triton"  kernels.flash_attention(..., window_size=, softcap=, sinks=, dropout_p=):
              key blocks outside the window are skipped, the cap and the sink are
              applied inside the online softmax; GQA without copying K and V
    "sdpa"    F.scaled_dot_product_attention, with the window as a dense (Nq, Nk)
              bool mask. SDPA has no soft-capping and no sinks: a module that uses
              either computes its attention with the reference's naive math on
              this backend, says so in its repr, and warns on each such call
    "naive"   the reference's own math (naive_attention)
"""
import warnings

import torch.nn.functional as F

import reference
from kernels import flash_attention
from reference.functional import causal_visibility, window_visibility

from .attention import _KernelBacked, kernel_dropout

SDPA_LACKS = ("softcap", "sinks")  # options SDPA cannot express; a window it can, as a dense mask


def _active(options):
    """The options that change something (a None window, softcap or sinks is no option at all)."""
    return {name: value for name, value in options.items() if value is not None}


def kernel_options(options):
    """flash_attention's keywords for these options."""
    options = _active(options)
    if "sinks" in options:
        options["sinks"] = options["sinks"].float()  # the kernel takes fp32 sinks; the cast passes gradients
    return options


class _VariantKernelBacked(_KernelBacked):
    """Mixin: the reference's attention options on the triton or sdpa backend."""

    def _sdpa_lacks(self):
        """The options of this module that SDPA cannot run ([] when it can run them all)."""
        return [name for name in SDPA_LACKS if name in _active(self.attention_options())]

    def extra_repr(self) -> str:
        lacking = self._sdpa_lacks() if self.backend == "sdpa" else []
        note = f" (naive math: SDPA has no {', '.join(lacking)})" if lacking else ""
        # _KernelBacked's backend=..., then the reference's own options
        return f"{super().extra_repr()}{note}, {super(_KernelBacked, self).extra_repr()}"

    def attend(self, queries, keys, values):
        """(B, num_heads, Nq, head_dim), (B, num_kv_groups, Nk, head_dim) x2 -> (B, num_heads, Nq, head_dim)."""
        lacking = self._sdpa_lacks() if self.backend == "sdpa" else []
        if self.backend == "naive" or lacking:
            if lacking:
                warnings.warn(f"{type(self).__name__}: SDPA has no {', '.join(lacking)}; backend='sdpa' runs "
                              "the reference's naive attention instead", stacklevel=2)
            return super(_KernelBacked, self).attend(queries, keys, values)  # the reference's own attend
        options = self.attention_options()
        dropout_p = self.dropout.p if self.training else 0.0
        if self.backend == "triton":
            return flash_attention(queries, keys, values, causal=self.causal, **kernel_options(options),
                                   **kernel_dropout(dropout_p))
        gqa = queries.shape[1] != keys.shape[1]
        if options.get("window_size") is None:
            return F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p, is_causal=self.causal,
                                                  enable_gqa=gqa)
        n_q, n_k = queries.shape[-2], keys.shape[-2]
        visible = window_visibility(n_q, n_k, options["window_size"], queries.device)  # (Nq, Nk), dense
        if self.causal:
            visible &= causal_visibility(n_q, n_k, queries.device)
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=visible, dropout_p=dropout_p,
                                              enable_gqa=gqa)


class SlidingWindowAttention(_VariantKernelBacked, reference.SlidingWindowAttention):
    """reference.SlidingWindowAttention (Mistral) with a `backend` argument (default "triton")."""


class SoftCappedAttention(_VariantKernelBacked, reference.SoftCappedAttention):
    """reference.SoftCappedAttention (Gemma 2) with a `backend` argument; on "sdpa" it runs naive math."""


class SinkAttention(_VariantKernelBacked, reference.SinkAttention):
    """reference.SinkAttention (gpt-oss) with a `backend` argument; on "sdpa" it runs naive math."""
