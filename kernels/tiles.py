"""Tile, mask and score helpers shared by the attention kernels (flash forward, flash backward).

Each helper is a small `@triton.jit` function with compile-time switches, so a
kernel pays only for the checks its shape and options need: a full tile loads
without a mask, a key block wholly inside the visible band computes without
one, and an option that is off (softcap, ALiBi, dropout) compiles to nothing.

The attention variants are modifications of one score tile, applied in
FlashAttention's order by the forward and the backward alike:

    s = q.k * sm_scale                          the scaled score
    s = softcap * tanh(s / softcap)             soft-capping (Gemma 2)
    s = s - slope * |i + Nk - Nq - j|           ALiBi (BLOOM, MPT)
    s = -inf where j is outside the band        causal, sliding window
        i + (Nk - Nq) - left <= j <= i + (Nk - Nq) + right

Causal is the band with right = 0 and no left limit, so one pair of bounds
serves both. Scores are carried in base-2 units (times LOG2E), since the
kernels use exp2.
"""
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # 1/ln 2, so exp(x) == exp2(x * LOG2E)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln 2, so log(x) == log2(x) * LN2
# Window bounds are runtime ints; an unlimited side is this far away, which no
# sequence reaches and which keeps every bound arithmetic inside int32.
UNLIMITED = 1 << 30
MAX_HEAD_DIM = 256


def _head_dim_pad(head_dim: int) -> int:
    """Tiles are powers of two and tl.dot needs K >= 16: pad D inside the kernel, with masked loads.

    Plain integer arithmetic: it runs on every launch, and triton.next_power_of_2 (a constexpr
    function) costs microseconds on the host.
    """
    return max(16, 1 << (head_dim - 1).bit_length())


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
def _load_rows_where(ptrs, row_ok, offs_col, n_cols, UPCAST: tl.constexpr):
    """Load a 2-D tile whose rows are gathered (a paged cache's, GQA-packed queries'): rows where row_ok, zeros elsewhere."""
    tile = tl.load(ptrs, mask=row_ok[:, None] & (offs_col[None, :] < n_cols), other=0.0)
    if UPCAST:  # the interpreter computes bf16 wrongly: work in fp32 there
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _row_descriptor(BASE, n_rows, stride_row, N_COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                    BLOCK_COLS: tl.constexpr):
    """A tensor descriptor over the (n_rows, N_COLS) matrix at BASE, whose rows are stride_row apart.

    Each load from it returns one (BLOCK_ROWS, BLOCK_COLS) tile. On Hopper a
    descriptor load is one TMA copy: the copy engine moves the whole
    tile into shared memory, asynchronously, with no address arithmetic in the
    warps. It zero-fills every element outside [0, n_rows) x [0, N_COLS), as
    _load_tile's masks do, so ragged rows and padded head-dim columns cost no
    mask. TMA needs BASE and stride_row 16-byte aligned: the launcher checks that
    before it lets the chooser pick a descriptor config. Built on the device,
    one per program; its 128-byte copy in global memory comes from the buffer
    set with triton.set_allocator.
    """
    return tl.make_tensor_descriptor(BASE, shape=[n_rows, N_COLS], strides=[stride_row, 1],
                                     block_shape=[BLOCK_ROWS, BLOCK_COLS])


@triton.jit
def _load_rows(src, row0, stride_row, offs_row, n_rows, offs_col, n_cols,
               CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows row0 .. row0 + BLOCK - 1 of a matrix, from a tensor descriptor (USE_TMA) or through _load_tile.

    src is a _row_descriptor, or the pointer tile of the matrix's first BLOCK rows
    (whose rows are stride_row apart); offs_row are the absolute row indices
    row0 + arange(BLOCK). Both paths return the same tile, zeros past the edges:
    the descriptor's bounds do in hardware what CHECK_ROWS / CHECK_COLS do with masks.
    """
    if USE_TMA:
        tile = src.load([row0, 0])
        if UPCAST:
            tile = tile.to(tl.float32)
    else:
        tile = _load_tile(src + row0.to(tl.int64) * stride_row, offs_row, n_rows, offs_col, n_cols, CHECK_ROWS,
                          CHECK_COLS, UPCAST)
    return tile


@triton.jit
def _cast_for_store(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x in the output dtype, rounded to nearest even as a GPU rounds.

    The interpreter converts fp32 to bf16 by truncating the low 16 bits, a bias
    toward zero that a GPU does not have; under it (UPCAST) round by hand first,
    so CPU results are the bits a GPU would store. fp16 conversion rounds already.
    """
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _round_to_fp8(x, dtype: tl.constexpr):
    """Non-negative fp32 x (probabilities, at most 1) rounded to nearest even in the fp8 `dtype`.

    The interpreter's own fp32 -> fp8 cast rounds wrongly (0.49 becomes 0.25 in e4m3), while a
    GPU's conversion rounds to nearest even. Rounded here first, the cast is exact, so the CPU
    computes the bits a GPU would. Normal values keep MANTISSA bits (rounded on the fp32 bit
    pattern, where a carry runs into the exponent as it should); below the smallest normal the
    steps are even (MIN_NORMAL * 2**-MANTISSA), and adding MAGIC, whose fp32 step is that, rounds there.
    """
    if dtype == tl.float8e4nv:  # e4m3fn
        MANTISSA: tl.constexpr = 3
        MIN_NORMAL: tl.constexpr = 0.015625  # 2**-6
        MAGIC: tl.constexpr = 16384.0  # 2**14: its fp32 step is 2**-9, e4m3's subnormal step
    else:  # e5m2
        MANTISSA: tl.constexpr = 2
        MIN_NORMAL: tl.constexpr = 0.00006103515625  # 2**-14
        MAGIC: tl.constexpr = 128.0  # 2**7: its fp32 step is 2**-16, e5m2's subnormal step
    SHIFT: tl.constexpr = 23 - MANTISSA
    HALF: tl.constexpr = (1 << (SHIFT - 1)) - 1
    KEEP: tl.constexpr = 0xFFFFFFFF ^ ((1 << SHIFT) - 1)
    bits = x.to(tl.uint32, bitcast=True)
    normal = ((bits + (HALF + ((bits >> SHIFT) & 1))) & KEEP).to(tl.float32, bitcast=True)
    subnormal = (x + MAGIC) - MAGIC
    return tl.where(x < MIN_NORMAL, subnormal, normal).to(dtype)


@triton.jit
def _e4m3_to_float(bits):
    """e4m3fn bytes (uint8) as fp32, exactly: an fp8 cache read where Triton has no e4m3 type (before sm_89).

    Triton compiles float8_e4m3fn only for GPUs with fp8 tensor cores; older ones (A100, RTX 3090)
    still hold e4m3 caches (vLLM's default fp8 cache). The byte is sign, 4 exponent bits (bias 7)
    and 3 mantissa bits: a normal value moves its fields into an fp32 bit pattern (exponent + 120),
    a subnormal is mantissa * 2**-9, and exponent 15 with mantissa 7 is NaN (e4m3fn has no inf).
    """
    b = bits.to(tl.uint32)
    sign = (b & 0x80) << 24
    exponent = (b >> 3) & 0xF
    mantissa = b & 0x7
    normal = (sign | ((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    # The sign as a bit, not a negation (0 - 0.0 is +0.0): -0.0 stays -0.0.
    subnormal = ((mantissa.to(tl.float32) * 0.001953125).to(tl.uint32, bitcast=True) | sign).to(tl.float32,
                                                                                                 bitcast=True)
    value = tl.where(exponent == 0, subnormal, normal)
    return tl.where((exponent == 15) & (mantissa == 7), float("nan"), value)


@triton.jit
def _sequence_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, off_z, N_Q, N_K, IS_VARLEN: tl.constexpr):
    """(q_start, k_start, seqlen_q, seqlen_k) of sequence off_z.

    Packed (IS_VARLEN): sequence z owns rows cu_seqlens[z]:cu_seqlens[z + 1] of q
    (and of k, v); the starts are 64-bit, since they multiply a row stride.
    Padded: every sequence starts at row 0 of its batch entry, with the full lengths.
    """
    if IS_VARLEN:
        q_start = tl.load(CU_SEQLENS_Q + off_z).to(tl.int64)
        k_start = tl.load(CU_SEQLENS_K + off_z).to(tl.int64)
        seqlen_q = tl.load(CU_SEQLENS_Q + off_z + 1) - q_start.to(tl.int32)
        seqlen_k = tl.load(CU_SEQLENS_K + off_z + 1) - k_start.to(tl.int32)
    else:
        q_start = 0
        k_start = 0
        seqlen_q = N_Q
        seqlen_k = N_K
    return q_start, k_start, seqlen_q, seqlen_k


@triton.jit
def _block_range(BLOCK: tl.constexpr, first_seen, last_seen, first_full, last_full, n, even_end):
    """Split [0, n) into blocks of BLOCK along one axis, for a tile of the other axis.

    The other axis's tile sees indices [first_seen, last_seen] (some of its rows do)
    and every one of its rows sees [first_full, last_full]. Returns (lo, full_lo,
    full_hi, hi): blocks in [lo, full_lo) and [full_hi, hi) need the element
    mask, blocks in [full_lo, full_hi) need none, and blocks outside [lo, hi)
    are never loaded. Blocks past even_end (the ragged last block) are masked.
    Bounds are clamped to >= 0 before dividing: the interpreter floors a negative
    quotient where the GPU truncates it.
    """
    lo = (tl.maximum(first_seen, 0) // BLOCK) * BLOCK
    hi = tl.minimum(n, tl.maximum(last_seen + 1, 0))
    full_lo = tl.cdiv(tl.maximum(first_full, 0), BLOCK) * BLOCK
    full_hi = (tl.maximum(last_full + 1, 0) // BLOCK) * BLOCK
    full_hi = tl.minimum(full_hi, even_end)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _stage_range(STAGE: tl.constexpr, lo, full_lo, full_hi, hi):
    """The blocks of one of _block_range's three stages: 0 the masked left part [lo, full_lo),
    1 the unmasked middle [full_lo, full_hi), 2 the masked right part [full_hi, hi)."""
    if STAGE == 0:
        stage_lo, stage_hi = lo, full_lo
    elif STAGE == 1:
        stage_lo, stage_hi = full_lo, full_hi
    else:
        stage_lo, stage_hi = full_hi, hi
    return stage_lo, stage_hi


@triton.jit
def _listed_block_start(it, BLOCK_LIST, LIST_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """The first index of step `it` of a block loop: `it` itself, or with a block mask (LIST_BLOCK > 0,
    the mask's block size) the it-th BLOCK-sized piece of the blocks BLOCK_LIST names (its entry 0 is
    the count, then block indices)."""
    if LIST_BLOCK > 0:
        PIECES: tl.constexpr = LIST_BLOCK // BLOCK
        start = tl.load(BLOCK_LIST + 1 + it // PIECES) * LIST_BLOCK + (it % PIECES) * BLOCK
    else:
        start = it
    return tl.multiple_of(start, BLOCK)


@triton.jit
def _key_range(start_m, N_Q, N_K, window_left, window_right,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr):
    """Key blocks for the query block [start_m, start_m + BLOCK_M): see _block_range.

    Query i sees keys i + offset - left .. i + offset + right, offset = N_K - N_Q
    (bottom-right alignment). The block's first query bounds what every row sees
    on the right and its last query on the left, and the other way round for
    what some row sees. Same arithmetic as `reference.tiled.causal_key_bounds`
    when only the right bound (causal, right = 0) is set.
    """
    offset = N_K - N_Q
    last_m = start_m + BLOCK_M - 1
    if MASK_LEFT:
        first_seen = start_m + offset - window_left
        first_full = last_m + offset - window_left
    else:
        first_seen = 0
        first_full = 0
    if MASK_RIGHT:
        last_seen = last_m + offset + window_right
        last_full = start_m + offset + window_right
    else:
        last_seen = N_K
        last_full = N_K
    return _block_range(BLOCK_N, first_seen, last_seen, first_full, last_full, N_K,
                        (N_K // BLOCK_N) * BLOCK_N)


@triton.jit
def _query_range(start_n, N_Q, N_K, window_left, window_right,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr):
    """Query blocks that see the key block [start_n, start_n + BLOCK_N): the mirror of _key_range.

    Key j is seen by queries j - offset - right .. j - offset + left. A ragged key
    block (past N_K) gets no unmasked range, so its padding keys are always masked.
    """
    offset = N_K - N_Q
    last_n = start_n + BLOCK_N - 1
    if MASK_RIGHT:
        first_seen = start_n - offset - window_right
        first_full = last_n - offset - window_right
    else:
        first_seen = 0
        first_full = 0
    if MASK_LEFT:
        last_seen = last_n - offset + window_left
        last_full = start_n - offset + window_left
    else:
        last_seen = N_Q
        last_full = N_Q
    even_end = tl.where(start_n + BLOCK_N <= N_K, (N_Q // BLOCK_M) * BLOCK_M, 0)
    return _block_range(BLOCK_M, first_seen, last_seen, first_full, last_full, N_Q, even_end)


@triton.jit
def _visible(q_idx, k_idx, N_K, offset, window_left, window_right, MASK_LEFT: tl.constexpr,
             MASK_RIGHT: tl.constexpr):
    """Bool tile: key k_idx exists and lies in query q_idx's band (indices broadcast to the tile)."""
    visible = k_idx < N_K
    if MASK_RIGHT:
        visible = visible & (k_idx <= q_idx + offset + window_right)
    if MASK_LEFT:
        visible = visible & (k_idx >= q_idx + offset - window_left)
    return visible


@triton.jit
def _tanh(x):
    """tanh in fp32 from exp2, accurate to a few ulp (Triton's interpreter has no libdevice tanh).

    (1 - e) / (1 + e) with e = exp(-2|x|) cancels badly near 0, where the odd
    Taylor series to x^9 is exact to rounding for |x| < 1/8.
    """
    ax = tl.abs(x)
    e = tl.math.exp2(ax * (-2.0 * LOG2E))  # tensor first: Triton 3.9 keeps constexpr * tensor a constexpr
    far = (1.0 - e) / (1.0 + e)
    x2 = x * x
    near = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(ax < 0.125, near, far)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores(qk, q_idx, k_idx, offset, sm_scale, softcap, alibi_slope, off_z, off_h, score_args, N_Q, N_K,
            HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, SCORE_MOD: tl.constexpr):
    """The modified score tile in base-2 units, tanh(s / softcap) for the backward (or 0 if off), and the
    tile SCORE_MOD was given (natural units; 0 without one), which its derivative needs in the backward.

    qk is the raw q.k tile; q_idx and k_idx broadcast to it (the backward's
    dK/dV kernel works on the transposed tile and passes them transposed).
    A user's SCORE_MOD(score, b, h, q_idx, kv_idx, score_args) sees the scaled
    score in natural units, as FlexAttention's score_mod does, after the
    built-in softcap and ALiBi; without one the scale folds into LOG2E. The mod's indices are
    clamped to the sequences (N_Q, N_K), so whatever it reads stays in bounds; a padding row or
    key it sees so is masked out of the result anyway.
    """
    if SCORE_MOD is not None:
        s = qk * sm_scale
        if HAS_SOFTCAP:
            t = _tanh(s / softcap)
            s = t * softcap
        else:
            t = 0.0
        if HAS_ALIBI:
            s = s - alibi_slope * tl.abs(q_idx + offset - k_idx).to(tl.float32)
        s_in = s
        s = SCORE_MOD(s, off_z, off_h, tl.minimum(q_idx, N_Q - 1), tl.minimum(k_idx, N_K - 1), score_args) * LOG2E
    else:
        if HAS_SOFTCAP:
            t = _tanh(qk * (sm_scale / softcap))
            s = t * (softcap * LOG2E)
        else:
            t = 0.0
            s = qk * (sm_scale * LOG2E)
        if HAS_ALIBI:
            s = s - (alibi_slope * LOG2E) * tl.abs(q_idx + offset - k_idx).to(tl.float32)
        s_in = 0.0
    return s, t, s_in


@triton.jit
def _score_grad(ds, tanh_s, s_in, q_idx, k_idx, off_z, off_h, score_args, grad_args, N_Q, N_K,
                HAS_SOFTCAP: tl.constexpr, SCORE_MOD_BWD: tl.constexpr, ACCUMULATE: tl.constexpr):
    """dS with respect to the scaled q.k, from dS with respect to the final score: _scores, differentiated.

    SCORE_MOD_BWD(grad, score, b, h, q_idx, kv_idx, score_args, grad_args, ACCUMULATE) returns the
    gradient with respect to the score it was given (s_in), and, when ACCUMULATE, adds the gradients
    of the tensors the mod reads into grad_args (one kernel of the backward accumulates, so each
    score's contribution is counted once). ALiBi adds a constant; softcap's derivative is 1 - tanh^2.
    Indices are clamped as in _scores: a padding row's or key's ds is 0, so it adds nothing.
    """
    if SCORE_MOD_BWD is not None:
        ds = SCORE_MOD_BWD(ds, s_in, off_z, off_h, tl.minimum(q_idx, N_Q - 1), tl.minimum(k_idx, N_K - 1), score_args,
                           grad_args, ACCUMULATE)
    if HAS_SOFTCAP:
        ds = ds * (1.0 - tanh_s * tanh_s)
    return ds


@triton.jit
def _mask_mod_visible(visible, q_idx, k_idx, off_z, off_h, mask_args, N_Q, N_K, MASK_MOD: tl.constexpr):
    """visible, and MASK_MOD(b, h, q_idx, kv_idx, mask_args) where a user's mask_mod is given (indices clamped
    to the sequences as in _scores: padding is masked by `visible` already)."""
    if MASK_MOD is not None:
        visible = visible & MASK_MOD(off_z, off_h, tl.minimum(q_idx, N_Q - 1), tl.minimum(k_idx, N_K - 1), mask_args)
    return visible


@triton.jit
def _dropout_keep(seed, stream, q_idx, k_idx, dropout_p):
    """Bool tile: which probabilities dropout keeps, a pure function of (seed, stream, row, column).

    Philox is counter-based: the forward and the backward regenerate the same
    mask from the same counters, so the mask is never stored. stream is the
    (batch * heads + head) for dense inputs, the head for packed ones, whose
    rows are then global token indices.
    """
    rows = (q_idx + 0 * k_idx).to(tl.uint32)
    cols = (k_idx + 0 * q_idx).to(tl.uint32)
    zero = rows * 0
    random, _, _, _ = tl.philox(seed, cols, rows, zero + stream.to(tl.uint32), zero)
    return tl.uint_to_uniform_float(random) >= dropout_p


@triton.jit
def _dropout_mask_kernel(SEED, MASK, dropout_p, N_ROWS, N_COLS, row_offset, stream_offset,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """MASK[s, i, j] = _dropout_keep for stream s + stream_offset, row i + row_offset: the tests' window on the mask."""
    stream = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(SEED), stream + stream_offset, offs_m[:, None] + row_offset, offs_n[None, :],
                         dropout_p)
    ptrs = MASK + stream.to(tl.int64) * N_ROWS * N_COLS + offs_m[:, None] * N_COLS + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < N_ROWS) & (offs_n[None, :] < N_COLS))
