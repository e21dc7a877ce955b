"""The paged-attention kernels: one forward for every serving step, and the merge of split-KV partials.

kernels/paged.py says what they compute and launches them; reference/paged.py
is the same computation in plain PyTorch, one sequence at a time.

One kernel for every step
-------------------------
A program owns a tile of rows: BLOCK_Q new tokens of one sequence times
HEADS query heads of one kv group (GQA packing, as flash-decoding does), so
each K and V tile it reads serves every head of the group. One token of a
group of 8 fills 8 rows; a 512-token chunk of the same model fills 128-row
tiles of 16 tokens each. The programs of a packed batch are numbered without
reading the lengths on the host: sequence b's tiles start at

    tile_start[b] = cu_seqlens_q[b] // BLOCK_Q + b

which grows with b and leaves each sequence room for all its tiles, so the
grid, total_q // BLOCK_Q + B programs per kv head, depends on shapes only,
and each program finds its sequence by a binary search over tile_start.
Programs past their sequence's last tile return at once.

Few new tokens per sequence (decode, verification) leave the GPU idle: the
key range of each (sequence, kv head) is then cut into up to NUM_SPLITS
chunks, one program each (split-KV), and a second kernel merges the partial
outputs by their log-sum-exp. NUM_SPLITS is a maximum chosen from shapes and
the SM count; each sequence uses as many splits as its own length warrants,
computed in the kernel. Long chunks already fill the GPU with their tiles and
run unsplit, writing the output directly.

Within a program the key loop is the flash forward's: an online softmax over
key tiles, unmasked tiles in the middle of the visible band, masked ones at
its edges (tiles.py: _block_range). Keys are looked up through the block
table per row, so any page size works, from 1 (token-granular tables) up.
"""
import triton
import triton.language as tl

from .tiles import (LN2, LOG2E, _block_range, _cast_for_store, _e4m3_to_float, _load_rows_where, _scores,
                    _stage_range)

MAX_SPLIT_QUERIES = 16  # new tokens per sequence up to which split-KV pays: decode, verification
MIN_KEYS_PER_SPLIT = 256  # below this, a split's fixed costs (its Q tile, its partial) dominate its reads
MIN_KEYS: tl.constexpr = tl.constexpr(MIN_KEYS_PER_SPLIT)
MAX_SPLIT_Q: tl.constexpr = tl.constexpr(MAX_SPLIT_QUERIES)


@triton.jit
def _find_sequence(CU_SEQLENS_Q, tile, BATCH, search_steps, BLOCK_Q: tl.constexpr):
    """The sequence b whose tiles hold `tile`: the last b with cu_seqlens_q[b] // BLOCK_Q + b <= tile."""
    lo = 0
    hi = BATCH - 1
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        start = tl.load(CU_SEQLENS_Q + mid) // BLOCK_Q + mid
        lo = tl.where(start <= tile, mid, lo)
        hi = tl.where(start <= tile, hi, mid - 1)
    return lo


@triton.jit
def _paged_visible(pos, k_idx, seq_start, seq_end, window_left, window_right,
                   MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_LEFTPAD: tl.constexpr):
    """Bool tile: key k_idx is one of the sequence's keys and in the band of the query at cache position pos."""
    visible = k_idx < seq_end
    if HAS_LEFTPAD:
        visible = visible & (k_idx >= seq_start)
    if MASK_RIGHT:
        visible = visible & (k_idx <= pos + window_right)
    if MASK_LEFT:
        visible = visible & (k_idx >= pos - window_left)
    return visible


@triton.jit
def _cache_tile(ptrs, readable, offs_col, n_cols, dtype: tl.constexpr, E4M3_BYTES: tl.constexpr):
    """A tile of cached keys or values in q's dtype: a 16-bit or fp32 cache as it is, an fp8 one cast exactly,
    or e4m3 bytes decoded (E4M3_BYTES)."""
    tile = _load_rows_where(ptrs, readable, offs_col, n_cols, False)
    if E4M3_BYTES:
        tile = _e4m3_to_float(tile)
    return tile.to(dtype)


@triton.jit
def _paged_inner(acc, l_i, m_i, bad, q, q_tail, k_base, v_base, bt_row, stride_btn, stride_kp, stride_kn, stride_kk,
                 stride_vp, stride_vn, stride_vk, K_SCALE, V_SCALE, stride_sp, stride_sn, pos, offs_n, offs_d, offs_dt,
                 offs_dv, lo, hi, seq_start, seq_end, num_pages, sm_scale, softcap, alibi_slope, window_left,
                 window_right, off_z, head, n_new, mask_args, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                 HEAD_DIM_TAIL: tl.constexpr,
                 HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr,
                 MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASKED: tl.constexpr, SHARED_KV: tl.constexpr,
                 KV_SCALES: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 MASK_MOD: tl.constexpr, E4M3_BYTES: tl.constexpr):
    """Walk key tiles [lo, hi) of one sequence, updating the online-softmax state of the tile's rows.

    bad collects block-table entries outside the pool: those keys are never read.
    A head dim past 256 is two tiles: the first HEAD_DIM_PAD columns (a power of two) and the
    HEAD_DIM_TAIL after them (MLA's 576 = 512 + 64), so nothing is padded to 1024.
    SHARED_KV: v is the first HEAD_DIM_V columns of k (MLA's latent cache): read once.
    KV_SCALES: an fp8 cache's dequantization, 1 per tensor or 2 per (token, kv head) (vLLM's two
    schemes): k's scale multiplies the scores, v's the probabilities, after the exact fp8 -> 16-bit cast.
    E4M3_BYTES: the cache is e4m3 read as bytes, decoded in software (a GPU before sm_89: tiles.py).
    MASK_MOD(b, h, q_idx, kv_idx, mask_args): a user's mask (a speculative-decoding tree), with q_idx
    the new token's index (0 .. n_new - 1) and kv_idx the key's position relative to the first new
    token (negative: cached), so one mod serves sequences of any cached length.
    """
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cur_n = start_n + offs_n
        in_seq = cur_n < seq_end
        if HAS_LEFTPAD:  # pads are no keys: never read (their rows may hold anything, NaN included)
            in_seq = in_seq & (cur_n >= seq_start)
        if PAGED:
            # Key n lives in page block_table[b, n // PAGE_SIZE], row n % PAGE_SIZE.
            page = tl.load(bt_row + (cur_n // PAGE_SIZE) * stride_btn, mask=in_seq, other=0)
            in_pool = (page >= 0) & (page < num_pages)
            bad = bad | (tl.sum((in_seq & ~in_pool).to(tl.int32), 0) > 0)
            page = tl.where(in_pool, page, 0).to(tl.int64)
            k_rows = page * stride_kp + (cur_n % PAGE_SIZE) * stride_kn
            v_rows = page * stride_vp + (cur_n % PAGE_SIZE) * stride_vn
            scale_rows = page * stride_sp + (cur_n % PAGE_SIZE) * stride_sn
            readable = in_seq & in_pool
        else:
            k_rows = cur_n.to(tl.int64) * stride_kn
            v_rows = cur_n.to(tl.int64) * stride_vn
            scale_rows = cur_n.to(tl.int64) * stride_sn
            readable = in_seq
        k = _cache_tile(k_base + k_rows[:, None] + offs_d[None, :] * stride_kk, readable, offs_d, HEAD_DIM,
                        q.dtype, E4M3_BYTES)
        # s = modified (q @ k.T) * sm_scale, in base-2 units.      (BLOCK_M, BLOCK_N)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HEAD_DIM_TAIL > 0:
            k_tail = _cache_tile(k_base + k_rows[:, None] + (HEAD_DIM_PAD + offs_dt[None, :]) * stride_kk,
                                 readable, HEAD_DIM_PAD + offs_dt, HEAD_DIM, q.dtype, E4M3_BYTES)
            qk = tl.dot(q_tail, tl.trans(k_tail), acc=qk, input_precision=DOT_PRECISION)
        if KV_SCALES == 2:
            qk = qk * tl.load(K_SCALE + scale_rows, mask=readable, other=0.0)[None, :]
        s, _, _ = _scores(qk, pos[:, None], cur_n[None, :], 0, sm_scale, softcap, alibi_slope[:, None], 0, 0, (),
                          0, 0, HAS_SOFTCAP, HAS_ALIBI, None)
        if MASKED:
            visible = _paged_visible(pos[:, None], cur_n[None, :], seq_start, seq_end, window_left, window_right,
                                     MASK_LEFT, MASK_RIGHT, HAS_LEFTPAD)
            if MASK_MOD is not None:
                first_new = seq_end - n_new
                visible = visible & MASK_MOD(off_z, head[:, None], pos[:, None] - first_new,
                                             cur_n[None, :] - first_new, mask_args)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key keeps m = -inf: subtract 0 instead (no NaN).
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_new_safe[:, None])
        # alpha rescales what was accumulated under the old maximum m_i.
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if SHARED_KV:
            v = k  # the latent's first HEAD_DIM_V (= HEAD_DIM_PAD) columns: already loaded
        else:
            v = _cache_tile(v_base + v_rows[:, None] + offs_dv[None, :] * stride_vk, readable, offs_dv, HEAD_DIM_V,
                            q.dtype, E4M3_BYTES)
        if KV_SCALES == 2:
            # p @ (v * scale per key) = (p * scale per key) @ v.
            p = p * tl.load(V_SCALE + scale_rows, mask=readable, other=0.0)[None, :]
        acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None], input_precision=DOT_PRECISION, out_dtype=acc.dtype)
        m_i = m_new
    return acc, l_i, m_i, bad


@triton.jit
def _paged_attn_fwd(Q, K, V, O, LSE, O_PART, LSE_PART, CU_SEQLENS_Q, SEQUSED_K, LEFTPAD, BLOCK_TABLE, SINKS,
                    ALIBI_SLOPES, K_SCALE, V_SCALE, sm_scale, softcap, window_left, window_right,
                    stride_qz, stride_qh, stride_qm, stride_qk,
                    stride_kp, stride_kh, stride_kn, stride_kk,
                    stride_vp, stride_vh, stride_vn, stride_vk,
                    stride_oz, stride_oh, stride_om, stride_ok,
                    stride_lz, stride_lh, stride_lm, stride_btz, stride_btn, stride_az, stride_ah,
                    stride_sp, stride_sh, stride_sn,
                    BATCH, N_Q, H_Q, GROUP, HEAD_BLOCKS, CAPACITY, NUM_PAGES, NUM_SPLITS, TILES, SPLIT_TILES,
                    search_steps, mask_args,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_TAIL: tl.constexpr,
                    HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HEADS: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, IS_VARLEN: tl.constexpr,
                    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
                    SPLIT: tl.constexpr, SHARED_KV: tl.constexpr, KV_SCALES: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, MASK_MOD: tl.constexpr = None, E4M3_BYTES: tl.constexpr = False):
    """One program: BLOCK_Q new tokens x HEADS query heads of one kv group, one split of their keys.

    N_Q: the dense layout's new tokens per sequence (unused when packed, IS_VARLEN).
    q and k have HEAD_DIM columns, read as HEAD_DIM_PAD (+ HEAD_DIM_TAIL) of them; v and o HEAD_DIM_V.
    K_SCALE, V_SCALE: an fp8 cache's scales, one each (KV_SCALES 1) or per (token, kv head) laid out
    like the cache's rows (KV_SCALES 2, strides stride_sp/h/n); unused otherwise.
    SPLIT (NUM_SPLITS > 1): the first TILES programs are the tiles above, doing split 0; after them
    come SPLIT_TILES * (NUM_SPLITS - 1) programs per sequence for splits 1.. of the tiles of
    sequences with at most MAX_SPLIT_Q new tokens (decode, verification: the others exit at once,
    their split 0 having done all their keys). A split sequence writes each split's normalised
    partial output and lse to slot (split, b, token, head) of O_PART (NUM_SPLITS, B, MAX_SPLIT_Q,
    Hq, HEAD_DIM_V) / LSE_PART for the merge; every other sequence writes O and LSE directly. So
    a mixed batch runs in one launch and a merge, and long chunks never split.
    """
    BLOCK_Q: tl.constexpr = BLOCK_M // HEADS
    pid = tl.program_id(0)
    off_kvh = (tl.program_id(1) // HEAD_BLOCKS).to(tl.int64)
    head_block = tl.program_id(1) % HEAD_BLOCKS
    split = 0
    if SPLIT and pid >= TILES:  # a split program: sequence, its tile, the split
        extra = pid - TILES
        off_z = extra // (SPLIT_TILES * (NUM_SPLITS - 1))
        local_tile = extra // (NUM_SPLITS - 1) % SPLIT_TILES
        split = 1 + extra % (NUM_SPLITS - 1)
        if IS_VARLEN:
            row0 = tl.load(CU_SEQLENS_Q + off_z)
            n_new = tl.load(CU_SEQLENS_Q + off_z + 1) - row0
        else:
            row0 = 0
            n_new = N_Q
        t0 = local_tile * BLOCK_Q
    elif IS_VARLEN:
        off_z = _find_sequence(CU_SEQLENS_Q, pid, BATCH, search_steps, BLOCK_Q)
        row0 = tl.load(CU_SEQLENS_Q + off_z)
        n_new = tl.load(CU_SEQLENS_Q + off_z + 1) - row0
        t0 = (pid - (row0 // BLOCK_Q + off_z)) * BLOCK_Q
    else:
        tiles_per_seq = tl.cdiv(N_Q, BLOCK_Q)
        off_z = pid // tiles_per_seq
        n_new = N_Q
        t0 = (pid % tiles_per_seq) * BLOCK_Q
        row0 = 0
    # This sequence splits its keys (few new tokens, splits asked for), or one program does them all.
    seq_split = SPLIT and n_new <= MAX_SPLIT_Q
    if t0 >= n_new or (split > 0 and not seq_split):
        return
    off_z = off_z.to(tl.int64)
    row0 = tl.full([], 0, tl.int64) + row0  # the first new token's row in q and o, 64-bit

    # The sequence's keys: [seq_start, seq_end) of its cache, clamped to the cache; a bad entry
    # turns its rows to NaN at the end instead of reading out of bounds.
    seq_end = tl.load(SEQUSED_K + off_z)
    bad = (seq_end < 0) | (seq_end > CAPACITY)
    seq_end = tl.minimum(tl.maximum(seq_end, 0), CAPACITY)
    seq_start = 0
    if HAS_LEFTPAD:
        seq_start = tl.load(LEFTPAD + off_z)
        bad = bad | (seq_start < 0) | (seq_start > seq_end)
        seq_start = tl.minimum(tl.maximum(seq_start, 0), seq_end)

    # Rows: token t0 + r // HEADS of the sequence's new ones, query head head_block * HEADS + r % HEADS of the group.
    rows = tl.arange(0, BLOCK_M)
    tok = t0 + rows // HEADS
    group_head = head_block * HEADS + rows % HEADS
    row_ok = (rows < BLOCK_Q * HEADS) & (tok < n_new) & (group_head < GROUP)
    head = off_kvh * GROUP + group_head
    pos = seq_end - n_new + tok  # each new token's position in the cache: its causal diagonal
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_dt = tl.arange(0, HEAD_DIM_TAIL if HEAD_DIM_TAIL > 0 else 16)  # MLA's rotary part
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)
    # 64-bit tile starts, 32-bit offsets within the tile.
    q_base = Q + off_z * stride_qz + (row0 + t0) * stride_qm + off_kvh * GROUP * stride_qh
    q_rows = q_base + ((rows // HEADS) * stride_qm + group_head * stride_qh)[:, None]
    q = _load_rows_where(q_rows + offs_d[None, :] * stride_qk, row_ok, offs_d, HEAD_DIM, UPCAST)
    q_tail = q
    if HEAD_DIM_TAIL > 0:
        q_tail = _load_rows_where(q_rows + (HEAD_DIM_PAD + offs_dt[None, :]) * stride_qk, row_ok,
                                  HEAD_DIM_PAD + offs_dt, HEAD_DIM, UPCAST)
    scale_base = 0  # where this kv head's (and, contiguous, this sequence's) scales start
    if KV_SCALES == 1:  # one scale per tensor: into the score scale now, into the output at the end
        sm_scale = sm_scale * tl.load(K_SCALE)
    elif KV_SCALES == 2:
        scale_base = off_kvh * stride_sh
        if not PAGED:
            scale_base += off_z * stride_sp

    alibi_slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        alibi_slope = tl.load(ALIBI_SLOPES + off_z * stride_az + head * stride_ah, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SINKS:
        # The sink is one more logit in every row with no value: exp2(sink - m_i) = 1 to start.
        # (A split sequence's merge adds it once instead.)
        sink = tl.load(SINKS + head, mask=row_ok, other=0.0).to(tl.float32) * LOG2E
        if SPLIT:
            m_i = tl.where(seq_split, m_i, sink)
            l_i = tl.where(seq_split, l_i, 1.0)
        else:
            m_i = sink
            l_i = l_i + 1.0

    # The keys some row of the tile sees, and those every row sees (tiles.py: _block_range).
    MASK_RIGHT: tl.constexpr = IS_CAUSAL or HAS_WINDOW
    first_pos = seq_end - n_new + t0
    last_pos = seq_end - n_new + tl.minimum(t0 + BLOCK_Q, n_new) - 1
    first_seen = seq_start
    first_full = seq_start
    if HAS_WINDOW:
        first_seen = tl.maximum(seq_start, first_pos - window_left)
        first_full = tl.maximum(seq_start, last_pos - window_left)
    last_seen = seq_end - 1
    last_full = seq_end - 1
    if MASK_RIGHT:
        last_seen = tl.minimum(last_seen, last_pos + window_right)
        last_full = tl.minimum(last_full, first_pos + window_right)
    lo, full_lo, full_hi, hi = _block_range(BLOCK_N, first_seen, last_seen, first_full, last_full, seq_end,
                                            (seq_end // BLOCK_N) * BLOCK_N)
    if seq_split:
        # This split's share of [lo, hi): whole tiles, as many splits as this sequence's keys warrant.
        splits = tl.minimum(tl.maximum(tl.cdiv(hi - lo, MIN_KEYS), 1), NUM_SPLITS)
        chunk = tl.cdiv(tl.cdiv(hi - lo, splits), BLOCK_N) * BLOCK_N
        lo = tl.minimum(lo + split * chunk, hi)
        hi = tl.minimum(lo + chunk, hi)
        full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
        full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)

    k_base = K + off_kvh * stride_kh
    v_base = V + off_kvh * stride_vh
    if not PAGED:
        k_base += off_z * stride_kp
        v_base += off_z * stride_vp
    bt_row = BLOCK_TABLE + off_z * stride_btz
    # Masked left edge, unmasked middle, masked right edge (the diagonal, the window, the ragged end).
    for stage in tl.static_range(3):
        stage_lo, stage_hi = _stage_range(stage, lo, full_lo, full_hi, hi)
        acc, l_i, m_i, bad = _paged_inner(acc, l_i, m_i, bad, q, q_tail, k_base, v_base, bt_row, stride_btn,
                                          stride_kp, stride_kn, stride_kk, stride_vp, stride_vn, stride_vk,
                                          K_SCALE + scale_base, V_SCALE + scale_base, stride_sp, stride_sn, pos,
                                          offs_n, offs_d, offs_dt, offs_dv, stage_lo, stage_hi, seq_start, seq_end,
                                          NUM_PAGES, sm_scale, softcap, alibi_slope, window_left, window_right,
                                          off_z, head, n_new, mask_args, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_TAIL,
                                          HEAD_DIM_V, BLOCK_N, PAGE_SIZE, PAGED, HAS_WINDOW, MASK_RIGHT, HAS_LEFTPAD,
                                          HAS_SOFTCAP, HAS_ALIBI, stage != 1 or MASK_MOD is not None, SHARED_KV,
                                          KV_SCALES, UPCAST, DOT_PRECISION, MASK_MOD, E4M3_BYTES)
    if KV_SCALES == 1:
        acc = acc * tl.load(V_SCALE)

    # A row that saw no key (and has no sink) has l_i = 0: o = 0, lse = -inf, never NaN, unless the input was bad.
    no_key = l_i == 0.0
    l_safe = tl.where(no_key, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(no_key, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o = tl.where(bad, float("nan"), o)
    lse = tl.where(bad, float("nan"), lse)
    d_ok = offs_dv[None, :] < HEAD_DIM_V
    if seq_split:
        slot = ((split * BATCH + off_z) * MAX_SPLIT_Q + tok) * H_Q + head  # (split, b, token, head)
        tl.store(LSE_PART + slot, lse, mask=row_ok)
        tl.store(O_PART + slot[:, None] * HEAD_DIM_V + offs_dv[None, :], o, mask=row_ok[:, None] & d_ok)
    else:
        tl.store(LSE + off_z * stride_lz + head * stride_lh + (row0 + tok) * stride_lm, lse, mask=row_ok)
        o_ptrs = (O + off_z * stride_oz + (row0 + t0) * stride_om
                  + ((rows // HEADS) * stride_om + head * stride_oh)[:, None] + offs_dv[None, :] * stride_ok)
        tl.store(o_ptrs, _cast_for_store(o, O.dtype.element_ty, UPCAST), mask=row_ok[:, None] & d_ok)



@triton.jit
def _paged_merge(O_PART, LSE_PART, O, LSE, SINKS, CU_SEQLENS_Q, stride_oz, stride_oh, stride_om, stride_ok,
                 stride_lz, stride_lh, stride_lm, BATCH, H_Q, N_Q, NUM_SPLITS,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
                 IS_VARLEN: tl.constexpr, HAS_SINKS: tl.constexpr, UPCAST: tl.constexpr):
    """One program: BLOCK_R partial slots (b, token, head) of the split sequences, merged over the splits in fp32.

    The online softmax again, one level up: lse_s plays the score, o_s the value.
        m_new = max(m_i, lse_s); alpha = exp(m_i - m_new); w = exp(lse_s - m_new)
        l_i = alpha * l_i + w;   acc = alpha * acc + w * o_s
    and o = acc / l_i, lse = m_i + log(l_i). A sink starts each row as one more split with no
    value (m_i = sink, l_i = 1). Slot r is (b, token, head) = (r // (MAX_SPLIT_Q * Hq),
    r // Hq % MAX_SPLIT_Q, r % Hq); only sequences with at most MAX_SPLIT_Q new tokens were split:
    the others' slots, and tokens past a sequence's count, are skipped.
    """
    num_slots = BATCH * MAX_SPLIT_Q * H_Q
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    off_z = offs_r // (MAX_SPLIT_Q * H_Q)
    tok = offs_r // H_Q % MAX_SPLIT_Q
    head = offs_r % H_Q
    in_batch = offs_r < num_slots
    if IS_VARLEN:
        row0 = tl.load(CU_SEQLENS_Q + off_z, mask=in_batch, other=0)
        n_new = tl.load(CU_SEQLENS_Q + off_z + 1, mask=in_batch, other=0) - row0
    else:
        row0 = 0
        n_new = N_Q + 0 * off_z
    row_mask = in_batch & (n_new <= MAX_SPLIT_Q) & (tok < n_new)
    tile_mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    if HAS_SINKS:
        m_i = tl.load(SINKS + head, mask=row_mask, other=0.0).to(tl.float32) * LOG2E
        l_i = tl.zeros([BLOCK_R], dtype=tl.float32) + 1.0
    else:
        m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM_PAD], dtype=tl.float32)
    for split in range(0, NUM_SPLITS):
        slot = split * num_slots + offs_r
        lse_s = tl.load(LSE_PART + slot, mask=row_mask, other=float("-inf")) * LOG2E
        o_s = tl.load(O_PART + slot[:, None] * HEAD_DIM + offs_d[None, :], mask=tile_mask, other=0.0)
        m_new = tl.maximum(m_i, lse_s)
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_new_safe)
        w = tl.math.exp2(lse_s - m_new_safe)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_s
        m_i = m_new
    no_key = l_i == 0.0
    l_safe = tl.where(no_key, 1.0, l_i)
    row = row0 + tok  # the token's row in o: packed (stride_oz = 0), or the b-th entry's
    tl.store(LSE + off_z * stride_lz + head * stride_lh + row * stride_lm,
             tl.where(no_key, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2), mask=row_mask)
    o_ptrs = O + (off_z * stride_oz + head * stride_oh + row * stride_om)[:, None] + offs_d[None, :] * stride_ok
    tl.store(o_ptrs, _cast_for_store(acc / l_safe[:, None], O.dtype.element_ty, UPCAST), mask=tile_mask)
