"""Context parallelism in plain PyTorch: one attention over a sequence cut across ranks, simulated in one process.

`kernels/context_parallel.py` runs this on real processes with torch.distributed.
Here every rank is an entry of a Python list and every message is a list
rotation, so the algebra reads (and is tested) without processes. The names are
the kernel file's: shard_sequence, unshard_sequence, context_parallel_attention.
Where the kernel file takes a process group, these take the list of all ranks'
shards (or the world size).

Why the LSE is all a rank needs. Cut the keys of one query row into blocks.
Block b alone gives, with scores s_j,
    lse_b = log sum_{j in b} exp(s_j)        o_b = sum_{j in b} exp(s_j - lse_b) v_j
and the whole row is
    lse = log sum_b exp(lse_b)                o = sum_b exp(lse_b - lse) o_b
So two partial results (o_a, lse_a) and (o_b, lse_b) merge exactly, in any
order, knowing nothing else about the keys (`merge_partials`): the online
softmax's rescale, one level up. A block of which a row sees no key has
lse_b = -inf and weight exp(-inf) = 0.

Ring (`ring_attention`): every rank keeps its query shard; K/V shards travel
one hop round the ring per step, and each rank merges what it computes against
each visiting shard. Causal attention uses the zigzag layout (`shard_of`) so
that every step gives every rank the same work (`ring_step`,
`ring_schedule_table`). The backward pass differentiates each step with the
final o and lse, so each step's P = exp(S - lse) is already the true softmax;
dQ sums locally and dK/dV travel with their K/V (`ring_attention_backward`).

Ulysses (`ulysses_attention`): an all-to-all turns sequence shards into head
shards, each rank runs ordinary attention over the whole sequence for its
heads, and a second all-to-all turns the output back.
"""
import math

import torch

from .functional import check_attention_inputs, repeat_kv
from .tiled import tiled_flash_attention, tiled_flash_attention_backward

ALL = slice(None)  # every row of a shard
STRATEGIES = ("ring", "ulysses")


# ----------------------------------------------------------------------------
# Layout: which tokens each rank holds
# ----------------------------------------------------------------------------
def check_shardable(length, world, zigzag, name="x", dim=2):
    """Raise a clear error unless a sequence of `length` cuts into equal shards."""
    parts = 2 * world if zigzag else world
    if length % parts:
        how = f"2 * world = {parts} (zigzag: two chunks per rank)" if zigzag else f"world = {parts}"
        raise ValueError(f"{name}.shape[{dim}] = {length} must be divisible by {how}; pad the sequence")


def check_zigzag_shard(length, name="x_local", dim=2):
    """A zigzag shard is two chunks of equal length: raise a clear error unless `length` is even."""
    if length % 2:
        raise ValueError(f"{name}.shape[{dim}] = {length} must be even: a zigzag shard is two chunks of equal "
                         f"length (rank r holds chunks r and 2 * world - 1 - r)")


def shard_of(x, rank, world, dim=2, zigzag=True):
    """Rank `rank`'s shard of the full tensor x, along `dim`.

    Contiguous: chunk `rank` of `world` equal chunks. Zigzag: chunks rank and
    2 * world - 1 - rank of 2 * world equal chunks, an early and a late one,
    so that every rank has the same amount of causal work.
    """
    check_shardable(x.shape[dim], world, zigzag, dim=dim)
    if not zigzag:
        return x.chunk(world, dim=dim)[rank]
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def shard_sequence(x, world, dim=2, zigzag=True):
    """Every rank's shard of x: a list of `world` tensors."""
    return [shard_of(x, rank, world, dim, zigzag) for rank in range(world)]


def unshard_sequence(shards, dim=2, zigzag=True):
    """The full tensor from every rank's shard, in rank order (the inverse of shard_sequence)."""
    if not zigzag:
        return torch.cat(shards, dim=dim)
    world = len(shards)
    check_zigzag_shard(shards[0].shape[dim], dim=dim)
    halves = [shard.chunk(2, dim=dim) for shard in shards]
    # Chunk i < world is the early half of rank i; chunk 2 * world - 1 - i is its late half.
    return torch.cat([halves[i][0] for i in range(world)] + [halves[i][1] for i in reversed(range(world))], dim=dim)


# ----------------------------------------------------------------------------
# The merge and the ring's schedule
# ----------------------------------------------------------------------------
def merge_partials(o, lse, o_block, lse_block):
    """Merge two partial attentions of the same query rows by their log-sum-exp.

    o, o_block: (..., N, D); lse, lse_block: (..., N). Returns (o, lse) in the
    dtype of `o` (the caller's accumulator, fp32 or wider). Rows where both
    lse are -inf (no key seen yet) stay o = 0, lse = -inf, never NaN.
    """
    lse_new = torch.logaddexp(lse, lse_block)
    # Subtracting 0 instead of -inf where no key was seen keeps exp(-inf - -inf) = NaN out.
    lse_safe = torch.where(lse_new == float("-inf"), 0.0, lse_new)
    weight = torch.exp(lse - lse_safe)[..., None]
    weight_block = torch.exp(lse_block - lse_safe)[..., None]
    return o * weight + o_block.to(o.dtype) * weight_block, lse_new


def ring_step(rank, step, world, causal, length):
    """What `rank` computes at ring `step`: (src, q_rows, kv_rows, masked).

    At step s a rank holds the K/V shard of rank src = rank - s (mod world).
    q_rows and kv_rows are slices of the two local shards of `length` tokens;
    masked says whether the block needs the causal mask. Non-causal: all
    against all. Causal, zigzag layout (rank r holds chunks r and 2w-1-r):
      step 0, src == r: the own diagonal, all against all under the mask;
      src < r: src's early chunk precedes both of mine and its late chunk
               follows both: all my rows against its first half;
      src > r: both of src's chunks lie between mine: my late half against all.
    Either way, after step 0, every rank does one chunk x two chunks, unmasked.
    """
    src = (rank - step) % world
    if not causal:
        return src, ALL, ALL, False
    if src == rank:
        return src, ALL, ALL, True
    half = length // 2
    if src < rank:
        return src, ALL, slice(0, half), False
    return src, slice(half, length), ALL, False


def ring_schedule_table(world=4, zigzag=True):
    """The causal ring's schedule as an ASCII table: which chunks each rank computes at each step.

    Work is counted in (N / (2 * world))^2 score tiles, a masked (diagonal)
    block counting half. zigzag=False shows the contiguous layout, which the
    kernels do not use for causal attention: rank r then holds chunk r of
    `world`, and ranks wait on the busiest one.
    """
    def chunk_ids(rank):  # chunks of 2 * world that the rank holds (a contiguous chunk is two of them)
        return (rank, 2 * world - 1 - rank) if zigzag else (2 * rank, 2 * rank + 1)

    def label(rank, rows):
        ids = chunk_ids(rank)[rows]
        return ",".join(str(i) for i in sorted({i if zigzag else i // 2 for i in ids}))

    def cell(rank, step):
        if zigzag:
            src, q_rows, kv_rows, masked = ring_step(rank, step, world, True, 2)
        else:
            src = (rank - step) % world
            if src > rank:
                return "-", 0.0
            q_rows, kv_rows, masked = ALL, ALL, src == rank
        work = len(range(2)[q_rows]) * len(range(2)[kv_rows]) * (0.5 if masked else 1.0)
        text = f"q{label(rank, q_rows)} x k{label(src, kv_rows)}" + (" masked" if masked else "")
        return text, work

    layout = (f"zigzag: {2 * world} chunks, rank r holds chunks r and {2 * world - 1}-r" if zigzag
              else f"contiguous: {world} chunks, rank r holds chunk r")
    header = ["step"] + [f"rank {r} holds {label(r, ALL)}" for r in range(world)] + ["slowest"]
    rows, totals, critical = [], [0.0] * world, 0.0
    for step in range(world):
        cells = [cell(rank, step) for rank in range(world)]
        slowest = max(work for _, work in cells)
        critical += slowest
        for rank, (_, work) in enumerate(cells):
            totals[rank] += work
        rows.append([str(step)] + [f"{text} ({work:g})" for text, work in cells] + [f"{slowest:g}"])
    rows.append(["total"] + [f"{t:g}" for t in totals] + [f"{critical:g}"])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([f"causal ring attention, {world} ranks, {layout}",
                      f"(work in (N/{2 * world})^2 score tiles; a masked block counts half)",
                      line(header), "-+-".join("-" * w for w in widths), *map(line, rows)])


# ----------------------------------------------------------------------------
# The two strategies, every rank simulated
# ----------------------------------------------------------------------------
def _rotate(per_rank):
    """One ring hop: every rank passes what it holds to the next rank."""
    return [per_rank[(rank - 1) % len(per_rank)] for rank in range(len(per_rank))]


def ring_attention(q_shards, k_shards, v_shards, causal=False, sm_scale=None):
    """Ring attention over every rank's shards. Returns (o_shards, lse_shards)."""
    world, length = len(q_shards), q_shards[0].shape[2]
    if causal:
        check_zigzag_shard(length, "q")
    sm_scale = 1.0 / math.sqrt(q_shards[0].shape[-1]) if sm_scale is None else sm_scale
    acc_dtype = torch.promote_types(q_shards[0].dtype, torch.float32)
    o = [torch.zeros(q.shape, dtype=acc_dtype, device=q.device) for q in q_shards]
    lse = [torch.full(q.shape[:3], float("-inf"), dtype=acc_dtype, device=q.device) for q in q_shards]
    kv = list(zip(k_shards, v_shards))  # step 0: every rank holds its own K/V
    for step in range(world):
        for rank in range(world):
            _, q_rows, kv_rows, masked = ring_step(rank, step, world, causal, length)
            k, v = kv[rank]
            o_block, lse_block = tiled_flash_attention(q_shards[rank][:, :, q_rows], k[:, :, kv_rows],
                                                       v[:, :, kv_rows], masked, sm_scale, return_lse=True)
            o[rank][:, :, q_rows], lse[rank][:, :, q_rows] = merge_partials(
                o[rank][:, :, q_rows], lse[rank][:, :, q_rows], o_block, lse_block)
        kv = _rotate(kv)
    return [o_r.to(q.dtype) for o_r, q in zip(o, q_shards)], lse


def ring_attention_backward(do_shards, q_shards, k_shards, v_shards, o_shards, lse_shards, causal=False,
                            sm_scale=None):
    """dq, dk, dv shards of ring attention, given the forward's final o and lse.

    Each step's block is differentiated with the final o and lse, so its
    recomputed P = exp(S - lse) is already the softmax over the whole sequence
    and delta = rowsum(dO * O) is the whole row's: the blocks' gradients simply
    add. dQ adds up on its own rank; each K/V shard's dK/dV accumulator travels
    with it and, after `world` hops, is home again.
    """
    world, length = len(q_shards), q_shards[0].shape[2]
    if causal:
        check_zigzag_shard(length, "q")
    sm_scale = 1.0 / math.sqrt(q_shards[0].shape[-1]) if sm_scale is None else sm_scale
    acc_dtype = torch.promote_types(q_shards[0].dtype, torch.float32)
    dq = [torch.zeros(q.shape, dtype=acc_dtype, device=q.device) for q in q_shards]
    kv = list(zip(k_shards, v_shards))
    dkv = [tuple(torch.zeros(k.shape, dtype=acc_dtype, device=k.device) for _ in "kv") for k in k_shards]
    for step in range(world):
        for rank in range(world):
            _, q_rows, kv_rows, masked = ring_step(rank, step, world, causal, length)
            (k, v), (dk, dv) = kv[rank], dkv[rank]
            dq_block, dk_block, dv_block = tiled_flash_attention_backward(
                q_shards[rank][:, :, q_rows], k[:, :, kv_rows], v[:, :, kv_rows], o_shards[rank][:, :, q_rows],
                lse_shards[rank][:, :, q_rows], do_shards[rank][:, :, q_rows], masked, sm_scale)
            dq[rank][:, :, q_rows] += dq_block
            dk[:, :, kv_rows] += dk_block
            dv[:, :, kv_rows] += dv_block
        kv, dkv = _rotate(kv), _rotate(dkv)  # the accumulators travel with their K/V
    return ([g.to(q.dtype) for g, q in zip(dq, q_shards)], [dk.to(k.dtype) for (dk, _), k in zip(dkv, k_shards)],
            [dv.to(k.dtype) for (_, dv), k in zip(dkv, k_shards)])


def ulysses_kv_repeats(h_q, h_kv, world):
    """How many times Ulysses copies each kv head so that every rank gets whole GQA groups.

    1 when world divides Hkv; world / Hkv when Hkv divides world; otherwise a clear error.
    """
    if h_q % world:
        raise ValueError(f"ulysses splits the query heads over the ranks: q.shape[1] = {h_q} must be divisible "
                         f"by the world size {world}")
    if h_kv % world == 0:
        return 1
    if world % h_kv == 0:
        return world // h_kv
    raise ValueError(f"ulysses needs the kv heads k.shape[1] = {h_kv} to be divisible by the world size {world}, "
                     f"or to divide it (they are then replicated up to {world})")


def all_to_all(shards, scatter_dim, gather_dim):
    """Rank j receives piece j of every rank's tensor (cut along scatter_dim), joined along gather_dim in rank order."""
    world = len(shards)
    pieces = [shard.chunk(world, dim=scatter_dim) for shard in shards]  # pieces[i][j]: from rank i to rank j
    return [torch.cat([pieces[i][j] for i in range(world)], dim=gather_dim) for j in range(world)]


def ulysses_attention(q_shards, k_shards, v_shards, causal=False, sm_scale=None):
    """Ulysses over every rank's contiguous shards. Returns (o_shards, lse_shards)."""
    world = len(q_shards)
    repeats = ulysses_kv_repeats(q_shards[0].shape[1], k_shards[0].shape[1], world)
    k_shards = [repeat_kv(k, repeats) for k in k_shards]
    v_shards = [repeat_kv(v, repeats) for v in v_shards]
    # (B, H, N / world, D) on each rank -> (B, H / world, N, D): the whole sequence, a slice of the heads
    q, k, v = (all_to_all(shards, scatter_dim=1, gather_dim=2) for shards in (q_shards, k_shards, v_shards))
    o, lse = zip(*(tiled_flash_attention(*qkv, causal, sm_scale, return_lse=True) for qkv in zip(q, k, v)))
    # (B, H / world, N, D) -> (B, H, N / world, D); lse likewise without D
    return all_to_all(o, scatter_dim=2, gather_dim=1), all_to_all(lse, scatter_dim=2, gather_dim=1)


def context_parallel_attention(q_shards, k_shards, v_shards, causal=False, strategy="ring", sm_scale=None,
                               return_lse=False):
    """Attention over a sequence cut into shards, one per simulated rank. Returns the list of output shards.

    Causal ring attention takes zigzag shards; everything else contiguous ones
    (non-causal attention does not care).
    """
    for q, k, v in zip(q_shards, k_shards, v_shards):
        check_attention_inputs(q, k, v)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    attention = ring_attention if strategy == "ring" else ulysses_attention
    o, lse = attention(q_shards, k_shards, v_shards, causal, sm_scale)
    return (list(o), list(lse)) if return_lse else list(o)
