"""Context parallelism: one attention over a sequence cut across ranks, on torch.distributed.

Each rank holds a shard of q, k and v, (B, H, N / world, D), of a sequence of N
tokens, and gets back its shard of the output. Two strategies, both built on
the flash-attention launchers and torch.distributed (NCCL on GPUs, gloo on
CPUs); `reference/context_parallel.py` simulates both in one process, with the
same names, and derives the algebra.

Ring (`strategy="ring"`). Each rank keeps its queries; the K/V shards travel
one hop round the ring per step by point-to-point isend/irecv, and the next
hop is already in flight while the kernel runs on the current shard. Each step
returns a partial output and its log-sum-exp, and partials merge exactly by
their LSE, in fp32:
    lse = logaddexp(lse_a, lse_b)      o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b
The backward pass runs the ring again: each step is differentiated with the
final o and lse (so its recomputed P is already the softmax over the whole
sequence, and the steps' gradients just add). dQ adds up on its own rank; each
shard's dK/dV accumulator, in fp32, travels with its K/V and arrives home after
`world` hops. Causal attention takes the zigzag layout (rank r holds chunks r
and 2*world-1-r of 2*world): after step 0 (the own causal diagonal) every rank
does the same unmasked work at every step (`reference.context_parallel.ring_step`),
so no rank waits on another. Per step a rank sends one K and one V shard;
GQA sends its Hkv heads as they are.

Ulysses (`strategy="ulysses"`). An all-to-all turns sequence shards into head
shards, (B, H, N / world, D) -> (B, H / world, N, D); `flash_attention` runs on
the whole sequence for those heads; an all-to-all turns the output back. Four
all-to-alls (q, k, v, o), none overlapped; kv heads are copied only when there
are fewer of them than ranks.

Layout: causal ring attention takes zigzag shards (`shard_sequence(x)`);
causal Ulysses takes contiguous ones (`shard_sequence(x, zigzag=False)`);
non-causal attention takes either. Every tensor is made contiguous before it
enters a collective or a send: a strided view sent as it is can arrive wrong
without an error.
"""
import math

import torch
import torch.distributed as dist

import reference.context_parallel as plain
from reference.functional import repeat_kv

from .flash_attention import _flash_bwd, _flash_fwd, check_flash_inputs
from .ops import flash_attention
from .runtime import accumulator_dtype, check_flag

KV_TAG, DKV_TAG = 1, 2  # two exchanges can be in flight between the same pair of ranks


# ----------------------------------------------------------------------------
# The process group, and messages
# ----------------------------------------------------------------------------
def _group_info(group):
    """(group, rank in it, its size); group None means the default (world) group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("context parallelism needs an initialised torch.distributed process group "
                           "(dist.init_process_group); for one process, call flash_attention")
    group = dist.group.WORLD if group is None else group
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the process group it was given")
    return group, rank, dist.get_world_size(group)


def _ring_exchange(tensor, group, rank, world, tag):
    """Post a hop: send `tensor` to the next rank, receive the previous rank's into a new buffer.

    Returns (buffer, pending); the buffer is valid after _wait(pending), and
    the sent tensor must not change until then (pending keeps it alive).
    """
    tensor = tensor.contiguous()
    received = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    next_rank = dist.get_global_rank(group, (rank + 1) % world)
    prev_rank = dist.get_global_rank(group, (rank - 1) % world)
    requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, tensor, next_rank, group, tag),
                                       dist.P2POp(dist.irecv, received, prev_rank, group, tag)])
    return received, (requests, tensor)


def _wait(pending):
    requests, _ = pending
    for request in requests:
        request.wait()


def _all_gather(x, group, world):
    """Every rank's x, in rank order."""
    x = x.contiguous()
    pieces = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(pieces, x, group=group)
    return pieces


def _all_to_all(x, group, world, scatter_dim, gather_dim):
    """Rank j gets piece j of every rank's x (cut along scatter_dim), joined along gather_dim in rank order."""
    if world == 1:
        return x
    # (..., S, ...) -> (world, ..., S / world, ...): stack copies, so the send buffer is contiguous
    send = torch.stack(x.chunk(world, dim=scatter_dim))
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


# ----------------------------------------------------------------------------
# Ring attention
# ----------------------------------------------------------------------------
class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, sm_scale):
        group, rank, world = _group_info(group)
        length = q.shape[2]
        o = torch.zeros(q.shape, dtype=accumulator_dtype(q.dtype), device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=o.dtype, device=q.device)
        kv = torch.stack((k, v))  # (2, B, Hkv, N / world, D): one message per hop, in k's dtype
        for step in range(world):
            if step + 1 < world:  # the next hop travels while this step computes
                kv_next, kv_pending = _ring_exchange(kv, group, rank, world, KV_TAG)
            _, rows, cols, masked = plain.ring_step(rank, step, world, causal, length)
            o_block, lse_block = _flash_fwd(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], masked, sm_scale)
            o[:, :, rows], lse[:, :, rows] = plain.merge_partials(o[:, :, rows], lse[:, :, rows],
                                                                  o_block, lse_block)
            if step + 1 < world:
                _wait(kv_pending)
                kv = kv_next
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.group, ctx.causal, ctx.sm_scale = group, causal, sm_scale
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        group, rank, world = _group_info(ctx.group)
        length = q.shape[2]
        do = torch.zeros_like(o) if do is None else do
        dq = torch.zeros(q.shape, dtype=lse.dtype, device=q.device)
        kv = torch.stack((k, v))
        dkv, dkv_pending = None, None  # the fp32 dK/dV accumulator of the K/V shard this rank holds
        for step in range(world):
            if step + 1 < world:
                kv_next, kv_pending = _ring_exchange(kv, group, rank, world, KV_TAG)
            _, rows, cols, masked = plain.ring_step(rank, step, world, ctx.causal, length)
            dlse_rows = None if dlse is None else dlse[:, :, rows].contiguous()
            dq_block, dk_block, dv_block = _flash_bwd(
                do[:, :, rows], q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], o[:, :, rows],
                lse[:, :, rows].contiguous(), masked, ctx.sm_scale, dlse=dlse_rows)
            if dkv_pending is None:  # step 0: this rank's own shard starts its accumulator
                dkv = torch.zeros(kv.shape, dtype=lse.dtype, device=kv.device)
            else:  # the accumulator of the visiting shard, with every earlier rank's share in it
                _wait(dkv_pending)
            dq[:, :, rows] += dq_block
            dkv[0][:, :, cols] += dk_block
            dkv[1][:, :, cols] += dv_block
            if world > 1:  # pass it on; after `world` hops every accumulator is home
                dkv, dkv_pending = _ring_exchange(dkv, group, rank, world, DKV_TAG)
            if step + 1 < world:
                _wait(kv_pending)
                kv = kv_next
        if world > 1:
            _wait(dkv_pending)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


# ----------------------------------------------------------------------------
# Ulysses: all-to-alls around flash_attention, each differentiable
# ----------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """All-to-all whose backward is the all-to-all the other way."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        group, _, world = _group_info(group)
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, world, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        group, _, world = _group_info(ctx.group)
        return _all_to_all(grad, group, world, ctx.gather_dim, ctx.scatter_dim), None, None, None


def _ulysses_attention(q, k, v, group, causal, sm_scale, return_lse):
    _, _, world = _group_info(group)
    repeats = plain.ulysses_kv_repeats(q.shape[1], k.shape[1], world)
    k, v = repeat_kv(k, repeats), repeat_kv(v, repeats)  # only when Hkv < world
    # (B, H, N / world, D) -> (B, H / world, N, D): the whole sequence, this rank's heads
    q, k, v = (_AllToAll.apply(t, group, 1, 2) for t in (q, k, v))
    o, lse = flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, return_lse=True)
    # (B, H / world, N, D) -> (B, H, N / world, D), and lse likewise
    return _AllToAll.apply(o, group, 2, 1), (_AllToAll.apply(lse, group, 2, 1) if return_lse else None)


# ----------------------------------------------------------------------------
# Sharding, differentiable: each one's backward is the other
#
# Convention: the full tensor is the same on every rank (replicated), so
# unshard's backward keeps this rank's shard of the full gradient and shard's
# backward gathers the shards' gradients into the full one.
# ----------------------------------------------------------------------------
class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, zigzag):
        group, rank, world = _group_info(group)
        ctx.group, ctx.dim, ctx.zigzag = group, dim, zigzag
        # A copy, never a view of x: autograd Functions should not return views of their inputs.
        return plain.shard_of(x, rank, world, dim, zigzag).clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, grad):
        group, _, world = _group_info(ctx.group)
        return plain.unshard_sequence(_all_gather(grad, group, world), ctx.dim, ctx.zigzag), None, None, None


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, group, dim, zigzag):
        group, _, world = _group_info(group)
        ctx.group, ctx.dim, ctx.zigzag = group, dim, zigzag
        return plain.unshard_sequence(_all_gather(x_local, group, world), dim, zigzag)

    @staticmethod
    def backward(ctx, grad):
        group, rank, world = _group_info(ctx.group)
        return plain.shard_of(grad, rank, world, ctx.dim, ctx.zigzag), None, None, None


def _check_dim(x, dim, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim = {dim} is out of range for {name} of shape {tuple(x.shape)}")
    return dim % x.dim()


def shard_sequence(x, group=None, dim=2, zigzag=True):
    """This rank's shard of the full tensor x along `dim` (the sequence; 2 in (B, H, N, D)).

    zigzag=True: rank r gets chunks r and 2*world-1-r of 2*world equal chunks
    (causal ring attention needs it); zigzag=False: chunk r of world.
    Differentiable: the gradients of every rank's shard are gathered into x's.
    """
    dim = _check_dim(x, dim, "x")
    _, _, world = _group_info(group)
    plain.check_shardable(x.shape[dim], world, zigzag, "x", dim)
    return _Shard.apply(x, group, dim, zigzag)


def unshard_sequence(x_local, group=None, dim=2, zigzag=True):
    """The full tensor from every rank's shard (all-gather); the inverse of shard_sequence.

    Differentiable: the full tensor's gradient is taken as the same on every
    rank, and this rank keeps its shard of it.
    """
    dim = _check_dim(x_local, dim, "x_local")
    _group_info(group)
    if zigzag:
        plain.check_zigzag_shard(x_local.shape[dim], "x_local", dim)
    return _Unshard.apply(x_local, group, dim, zigzag)


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------
def context_parallel_attention(q, k, v, group=None, causal=False, strategy="ring", sm_scale=None, return_lse=False):
    """Attention over a sequence sharded across the ranks of `group`, differentiable.

    q (B, Hq, N / world, D), k and v (B, Hkv, N / world, D): this rank's shards,
    as flash_attention takes them (GQA/MQA, any dtype it takes). Causal ring
    attention takes zigzag shards, causal Ulysses contiguous ones (see
    shard_sequence). Returns this rank's shard of the output, and with
    return_lse=True the natural-log lse of its rows (fp32; float64 for float64).
    """
    check_flash_inputs(q, k, v, sm_scale)
    causal, return_lse = check_flag(causal, "causal"), check_flag(return_lse, "return_lse")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q, k and v must be shards of one sequence, of the same length on a rank: "
                         f"q has {q.shape[2]} tokens, k and v {k.shape[2]}")
    if strategy not in plain.STRATEGIES:
        raise ValueError(f"strategy must be one of {plain.STRATEGIES}, got {strategy!r}")
    _, _, world = _group_info(group)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if strategy == "ring":
        if causal:  # zigzag: an early and a late chunk of equal length
            plain.check_zigzag_shard(q.shape[2], "q", 2)
        o, lse = _RingAttention.apply(q, k, v, group, causal, sm_scale)
    else:
        plain.ulysses_kv_repeats(q.shape[1], k.shape[1], world)  # a clear error before any message
        o, lse = _ulysses_attention(q, k, v, group, causal, sm_scale, return_lse)
    return (o, lse) if return_lse else o
