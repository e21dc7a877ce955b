"""Online softmax in Triton: softmax over the last dimension of a tensor of any rank.

One program per row. Pass 1 walks the row block by block keeping a running
max m and normaliser l; when a block raises the max from m_old to m_new, the
sum so far is rescaled by exp(m_old - m_new), which turns every term
exp(x - m_old) into exp(x - m_new) (see reference/softmax.py, online_softmax,
which this mirrors line by line). Pass 2 writes exp(x - m) / l.

Memory traffic: read the row twice, write it once (3N elements), for any row
length, with O(BLOCK_N) registers. The safe softmax reads it three times
(max, sum, normalise) unless the row fits in one block.
"""
import torch
import triton
import triton.language as tl

from . import runtime
from .runtime import INTERPRET, check_runnable

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # 1/ln 2, so exp(x) == exp2(x * LOG2E)
# Columns per step. The interpreter pays per step, the GPU per register: 4096
# fp32 values over 8 warps is 16 registers a thread.
_MAX_BLOCK_N = 1024 if INTERPRET else 4096


@triton.jit
def _softmax_online(X, Y, stride_xr, stride_xc, stride_yr, stride_yc, N_COLS, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xr
    y_row = Y + row * stride_yr
    offs = tl.arange(0, BLOCK_N)

    # Pass 1: running max m and normaliser l, read once.       (read N)
    m = float("-inf")
    l = 0.0
    for start in range(0, N_COLS, BLOCK_N):
        cols = start + offs
        x = tl.load(x_row + cols * stride_xc, mask=cols < N_COLS, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        # Until a finite logit arrives m stays -inf; subtract 0 then, so -inf - -inf never makes NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.math.exp2((m - m_safe) * LOG2E) + tl.sum(tl.math.exp2((x - m_safe) * LOG2E), 0)
        m = m_new

    # Pass 2: normalise and write.                               (read N, write N)
    for start in range(0, N_COLS, BLOCK_N):
        cols = start + offs
        x = tl.load(x_row + cols * stride_xc, mask=cols < N_COLS, other=float("-inf")).to(tl.float32)
        y = tl.math.exp2((x - m) * LOG2E) / l
        tl.store(y_row + cols * stride_yc, y.to(Y.dtype.element_ty), mask=cols < N_COLS)


def _softmax_launch(x: torch.Tensor, out: torch.Tensor) -> None:
    """Launch one program per row of the 2-D views x and out."""
    n_rows, n_cols = x.shape
    block_n = min(_MAX_BLOCK_N, max(16, triton.next_power_of_2(n_cols)))
    num_warps = 4 if block_n <= 1024 else 8
    with runtime.on_device(x.device):
        _softmax_online[(n_rows,)](x, out, *x.stride(), *out.stride(), n_cols, BLOCK_N=block_n, num_warps=num_warps)


def softmax(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last dimension, like torch.softmax(x, -1). fp32, fp16 or bf16; any rank >= 1.

    out: optional preallocated result of x's shape and dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    check_runnable(x, "x")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must match x in shape, dtype and device; got {tuple(out.shape)} {out.dtype} {out.device}")
    if x.numel() == 0:
        return out
    # (..., N) -> (rows, N): a view when the layout allows, a copy otherwise.
    x2 = x.reshape(-1, x.shape[-1])
    out2 = out.view(-1, x.shape[-1]) if out.is_contiguous() else torch.empty_like(x2)
    _softmax_launch(x2, out2)
    if out2.data_ptr() != out.data_ptr():
        out.copy_(out2.view(x.shape))
    return out
