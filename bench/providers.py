"""What is benchmarked: every implementation behind one calling convention.

Attention: `prepare(q, k, v, causal)` does all the work that must not be
timed (imports, building a block mask, wrapping a compiled function) and
returns a zero-argument callable computing the output (B, Hq, N, D) from
q (B, Hq, N, D) and k, v (B, Hkv, N, D). The sweep only has Nq == Nk, where
causal is the plain lower triangle for every provider.

    naive           reference.naive_attention: materialises the N x N scores
    sdpa-<backend>  F.scaled_dot_product_attention pinned to one backend with
                    torch.nn.attention.sdpa_kernel; enable_gqa=True for GQA
    flex            FlexAttention under torch.compile (GPU only)
    triton          this project's kernel, kernels.flash_attention
    flash_attn      Tri Dao's flash_attn_func, only if the package is installed

Softmax: `prepare(x)` returns a callable computing softmax over the last dim.
Modules: `build(d_model, context_length, num_heads)` returns the nn.Module.

A provider that cannot take a case raises Unsupported (or the library's own
error); the sweep reports it in the status column and goes on.
"""
import importlib
import importlib.util
import os

import torch
import torch.nn.functional as F


class Unsupported(Exception):
    """This provider cannot run this case here; the message is the short reason."""


# ----------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------
def _naive(q, k, v, causal):
    from reference import naive_attention

    return lambda: naive_attention(q, k, v, causal=causal)


def _sdpa(backend_name):
    def prepare(q, k, v, causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        kwargs = {"is_causal": causal}
        if q.shape[1] != k.shape[1]:
            kwargs["enable_gqa"] = True  # query head h reads kv head h // (Hq / Hkv), no copy

        def run():
            # The backend is chosen in the forward call; the backward follows it.
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, **kwargs)

        return run

    return prepare


# torch.compile with dynamic=True compiles one graph per (head dim, mask,
# GQA, grad mode) instead of one per sequence length and batch: on a fresh
# machine that is the difference between seconds and minutes of compiling.
# Its kernels cannot assume N is a multiple of the block size, so they mask
# their loads; BENCH_FLEX_DYNAMIC=0 compiles per shape instead.
FLEX_DYNAMIC = os.environ.get("BENCH_FLEX_DYNAMIC", "1") != "0"
FLEX_RECOMPILE_LIMIT = 64  # graphs above; past dynamo's default (8) it would silently run flex eagerly
_flex_compiled = None


def _compiled_flex_attention():
    global _flex_compiled
    if _flex_compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), FLEX_RECOMPILE_LIMIT))
        if hasattr(config, "fail_on_recompile_limit_hit"):
            config.fail_on_recompile_limit_hit = True  # an error row, not an eager flex timed as if compiled
        # The bwd mode times out.backward(dout, retain_graph=True). With dynamic shapes AOTAutograd
        # compiles the backward ahead of time, letting it reuse ("donate") saved buffers such as
        # flex's logsumexp, and such a backward raises on retain_graph=True ("...compiled with
        # non-empty donated buffers..."). Donation only saves a little memory in the backward.
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
        _flex_compiled = torch.compile(flex_attention, dynamic=FLEX_DYNAMIC)
    return _flex_compiled


def _causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _flex(q, k, v, causal):
    if q.device.type != "cuda":
        raise Unsupported("benchmarked on a GPU only (compiled)")
    from torch.nn.attention.flex_attention import create_block_mask

    # Which (query block, key block) tiles are empty, full or partial: built once, not timed.
    block_mask = None
    if causal:
        block_mask = create_block_mask(_causal_mask, None, None, q.shape[2], k.shape[2], device=q.device)
    flex = _compiled_flex_attention()
    gqa = q.shape[1] != k.shape[1]
    return lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def _require_triton_runnable(t):
    """CPU tensors need the interpreter, which must be on before `kernels` is first imported."""
    import kernels

    if t.device.type != "cuda" and not kernels.INTERPRET:
        raise Unsupported("CPU tensors, but `kernels` was imported without TRITON_INTERPRET=1")


def _triton(q, k, v, causal):
    from kernels import flash_attention

    _require_triton_runnable(q)
    return lambda: flash_attention(q, k, v, causal=causal)


def _flash_attn(q, k, v, causal):
    try:
        from flash_attn import flash_attn_func
    except ImportError as exc:
        raise Unsupported(f"flash_attn not importable ({exc})") from None

    def run():
        # (B, H, N, D) -> (B, N, H, D): views; flash_attn needs only the last dim contiguous.
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return out.transpose(1, 2)  # (B, N, Hq, D) -> (B, Hq, N, D)

    return run


ATTENTION = {
    "naive": _naive,
    "sdpa-math": _sdpa("MATH"),
    "sdpa-flash": _sdpa("FLASH_ATTENTION"),
    "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
    "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
    "flex": _flex,
    "triton": _triton,
    "flash_attn": _flash_attn,
}
# SDPA's CPU build has the math and flash backends only; the others are CUDA kernels.
CPU_ATTENTION = ("naive", "sdpa-math", "sdpa-flash", "triton")


def attention_names(device_type):
    """The attention providers that can run on this kind of device, in table order."""
    if device_type == "cpu":
        return list(CPU_ATTENTION)
    names = [name for name in ATTENTION if name != "flash_attn"]
    if importlib.util.find_spec("flash_attn") is not None:
        names.append("flash_attn")
    return names


# ----------------------------------------------------------------------------
# Softmax over the last dimension
# ----------------------------------------------------------------------------
def _torch_softmax(x):
    return lambda: torch.softmax(x, dim=-1)


def _naive_softmax(x):
    from reference import naive_softmax

    return lambda: naive_softmax(x)


def _triton_softmax(x):
    from kernels import softmax

    _require_triton_runnable(x)
    return lambda: softmax(x)


SOFTMAX = {"torch": _torch_softmax, "naive": _naive_softmax, "triton": _triton_softmax}


# ----------------------------------------------------------------------------
# Multi-head attention modules: (B, N, d_model) -> (B, N, d_model), causal
# ----------------------------------------------------------------------------
def _module(package, class_name, **kwargs):
    def build(d_model, context_length, num_heads):
        try:
            cls = getattr(importlib.import_module(package), class_name)
        except (ImportError, AttributeError) as exc:
            raise Unsupported(f"{package}.{class_name} not importable ({type(exc).__name__})") from None
        return cls(d_model, d_model, context_length, 0.0, num_heads, **kwargs)

    return build


MODULES = {
    "wrapper": _module("reference", "MultiHeadAttentionWrapper"),  # the seed: one CausalAttention per head
    "efficient-mha": _module("reference", "EfficientMHA"),  # fused qkv + SDPA
    "mha-triton": _module("modules", "MultiHeadAttention", backend="triton"),
}
# The float64 reference a Triton-backed module is checked against: the same class and weights.
MODULE_REFERENCE = {"mha-triton": _module("modules", "MultiHeadAttention", backend="naive")}
