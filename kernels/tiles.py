"""Tile and mask helpers shared by every attention kernel (flash forward, flash backward, decode).

Each helper is a small `@triton.jit` function with compile-time switches, so a
kernel pays only for the checks its shape needs: a full tile loads without a
mask, a block wholly below the causal diagonal computes without one.
"""
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # 1/ln 2, so exp(x) == exp2(x * LOG2E)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln 2, so log(x) == log2(x) * LN2


@triton.jit
def _load_tile(ptrs, offs_row, n_rows, offs_col, n_cols,
               CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr, UPCAST: tl.constexpr):
    """Load a 2-D tile, masking only the edges that can be ragged; zeros fill the rest.

    Zero padding is harmless everywhere it lands: a zero head-dim column adds
    nothing to q.k, and a zero key or query row is masked out of the softmax.
    Full tiles skip the mask entirely (CHECK_* are compile-time flags).
    """
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=(offs_row[:, None] < n_rows) & (offs_col[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=offs_row[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=offs_col[None, :] < n_cols, other=0.0)
    else:
        tile = tl.load(ptrs)
    if UPCAST:  # the interpreter computes bf16 wrongly: work in fp32 there
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _causal_key_range(start_m, N_Q, N_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Split the key axis for the query block starting at start_m.

    Returns (full_end, end): key blocks in [0, full_end) are full and wholly
    visible, so they need no mask; blocks in [full_end, end) straddle the
    diagonal or the ragged end of the keys and are masked element by element;
    keys from `end` on are above the diagonal and are never loaded.
    Same arithmetic as `reference.tiled.causal_key_bounds`.
    """
    full_key_blocks_end = (N_K // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        offset = N_K - N_Q  # query i sees keys j <= i + offset
        # The block's last query sees keys up to start_m + BLOCK_M - 1 + offset.
        end = tl.minimum(N_K, tl.maximum(0, start_m + BLOCK_M + offset))
        # Key block [s, s + BLOCK_N) is wholly visible if its last key is seen by the
        # block's first query. Clamp to >= 0 before dividing: the interpreter floors
        # a negative quotient while the GPU truncates it.
        full_end = (tl.maximum(0, start_m + offset + 1) // BLOCK_N) * BLOCK_N
        full_end = tl.minimum(tl.minimum(full_end, end), full_key_blocks_end)
    else:
        end = N_K
        full_end = full_key_blocks_end
    return full_end, end
