"""The processes behind tests/test_context_parallel.py: a pool of gloo ranks on localhost, started once.

`Pool(world)` spawns `world` processes with torch.multiprocessing. Each joins
a gloo process group, builds its subgroups once, then runs checks sent to it
by name until it is told to stop; every rank answers every check, so a check
that fails on one rank reports that rank's traceback instead of hanging the
others. The checks build the same full inputs on every rank from a seed,
shard them, run context-parallel attention, and hand back the full output and
gradients (through unshard_sequence and shard_sequence's backward) for the
test process to hold against its references.
"""
import io
import os
import queue
import socket
import traceback
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

RESULT_TIMEOUT_S = 120  # a check that takes longer has deadlocked: fail instead of hanging CI


@dataclass(frozen=True)
class CPCase:
    """One context-parallel check: a strategy, a mask, a head layout and a dtype over `world` ranks."""
    world: int
    strategy: str
    causal: bool
    h_q: int
    h_kv: int
    dtype: torch.dtype
    chunk: int = 3  # tokens per chunk: N = 2 * world * chunk, so zigzag and contiguous shards both fit
    head_dim: int = 16
    batch: int = 1
    transposed_grad: bool = False  # the output's gradient arrives as a transposed view
    return_lse: bool = False
    seed: int = 0

    @property
    def n(self):
        return 2 * self.world * self.chunk

    @property
    def zigzag(self):
        return self.causal and self.strategy == "ring"

    @property
    def id(self):
        kind = "mha" if self.h_q == self.h_kv else "mqa" if self.h_kv == 1 else "gqa"
        extras = "".join(["-tgrad" if self.transposed_grad else "", "-lse" if self.return_lse else ""])
        return (f"w{self.world}-{self.strategy}-{'causal' if self.causal else 'full'}-{kind}{self.h_q}x{self.h_kv}"
                f"-n{self.n}-d{self.head_dim}-{str(self.dtype).replace('torch.', '')}{extras}")

    def inputs(self):
        """Full q, k, v and the output's gradient, the same in every process (random, never zeros)."""
        generator = torch.Generator().manual_seed(self.seed)

        def rand(heads):
            return torch.randn(self.batch, heads, self.n, self.head_dim, generator=generator).to(self.dtype)
        return rand(self.h_q), rand(self.h_kv), rand(self.h_kv), rand(self.h_q)


def free_port():
    """A port the OS says is free now (a fixed port collides when test runs overlap)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------
# In the child processes
# ----------------------------------------------------------------------------
def _attention_check(case: CPCase, group):
    from kernels import context_parallel_attention, shard_sequence, unshard_sequence

    q, k, v, do = case.inputs()
    leaves = [t.requires_grad_() for t in (q, k, v)]
    shards = [shard_sequence(t, group, zigzag=case.zigzag) for t in leaves]
    out = context_parallel_attention(*shards, group=group, causal=case.causal, strategy=case.strategy,
                                     return_lse=case.return_lse)
    o_local, lse_local = out if case.return_lse else (out, None)
    if case.transposed_grad:
        # (B, H, n, D) -> (B, n, H, D), gathered along the sequence dim 1: the gradient reaching
        # o_local is then a transposed view, not a contiguous tensor.
        o = unshard_sequence(o_local.transpose(1, 2), group, dim=1, zigzag=case.zigzag)
        loss = (o * do.transpose(1, 2)).sum()
        o = o.transpose(1, 2)
    else:
        o = unshard_sequence(o_local, group, zigzag=case.zigzag)
        loss = (o * do).sum()
    lse = None
    if case.return_lse:
        lse = unshard_sequence(lse_local, group, zigzag=case.zigzag)
        loss = loss + lse.sum()  # the lse's gradient flows back too
    loss.backward()
    return {"o": o.detach(), "lse": None if lse is None else lse.detach(), "grads": [t.grad for t in leaves]}


def _shard_roundtrip_check(group, zigzag, dim):
    """shard then unshard is the identity; gradients (transposed views included) come back whole."""
    import torch.distributed as dist

    from kernels import shard_sequence, unshard_sequence
    from reference.context_parallel import shard_of

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4 * world, 5, generator=generator).movedim(2, dim).requires_grad_()
    g = torch.randn(x.shape, generator=generator)
    x_local = shard_sequence(x, group, dim=dim, zigzag=zigzag)
    same = torch.equal(x_local, shard_of(x.detach(), rank, world, dim, zigzag))
    # The loss sees x_local through a transpose, so x_local's gradient is a transposed view.
    last = x_local.dim() - 1
    g_local_t = shard_of(g, rank, world, dim, zigzag).transpose(0, last).contiguous()
    (x_local.transpose(0, last) * g_local_t).sum().backward()
    x_grad_ok = torch.equal(x.grad, g)
    y = unshard_sequence(x_local.detach().requires_grad_(), group, dim=dim, zigzag=zigzag)
    return {"roundtrip": torch.equal(y, x.detach()), "shard": same, "shard_grad": x_grad_ok}


def _error_check(kind, group):
    """Run one kind of bad input; return the error's type and message (every rank raises before sending)."""
    from kernels import context_parallel_attention, shard_sequence

    def qkv(h_q=2, h_kv=2, n_q=6, n_k=6):
        return torch.randn(1, h_q, n_q, 8), torch.randn(1, h_kv, n_k, 8), torch.randn(1, h_kv, n_k, 8)

    calls = {
        "lengths": lambda: context_parallel_attention(*qkv(n_q=6, n_k=4), group=group),
        "odd_zigzag": lambda: context_parallel_attention(*qkv(n_q=5, n_k=5), group=group, causal=True),
        "shard_zigzag": lambda: shard_sequence(torch.randn(1, 2, 6, 8), group),
        "shard_contiguous": lambda: shard_sequence(torch.randn(1, 2, 5, 8), group, zigzag=False),
        "shard_dim": lambda: shard_sequence(torch.randn(1, 2, 8, 8), group, dim=4),
        "ulysses_q_heads": lambda: context_parallel_attention(*qkv(h_q=3, h_kv=1), group=group, strategy="ulysses"),
        "ulysses_kv_heads": lambda: context_parallel_attention(*qkv(h_q=6, h_kv=3), group=group, strategy="ulysses"),
        "strategy": lambda: context_parallel_attention(*qkv(), group=group, strategy="tree"),
    }
    try:
        calls[kind]()
    except Exception as error:  # noqa: BLE001 - the type is what the test checks
        return type(error).__name__, str(error)
    return None, "no error"


def _pack(value):
    """Tensors travel back as bytes (torch.save): no shared-memory handles outliving the check."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _worker(rank, world, port, tasks, results):
    # Before anything imports `kernels`: the Triton interpreter, and one thread per process
    # (the ranks share two cores).
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=RESULT_TIMEOUT_S))
    # Subgroups, created by every rank in the same order (new_group is collective). A subgroup
    # without rank 0 checks that group ranks are mapped to global ones.
    groups = {world: None}
    if world >= 4:
        groups[3] = dist.new_group(list(range(1, world)))
    singletons = [dist.new_group([r]) for r in range(world)]
    groups[1] = singletons[rank]
    import kernels  # noqa: F401 - import (and decorate the kernels) once, before the first check

    while True:
        task = tasks[rank].get()
        if task is None:
            break
        name, sub_world, args = task
        # The ranks of a subgroup of `sub_world` < world are the last ones; world 1 is every rank alone.
        member = sub_world in (1, world) or rank >= world - sub_world
        try:
            if not member:
                value = None
            elif name == "attention":
                value = _attention_check(args, groups[sub_world])
            elif name == "shard_roundtrip":
                value = _shard_roundtrip_check(groups[sub_world], *args)
            else:
                value = _error_check(args, groups[sub_world])
            results.put((rank, "ok", _pack(value)))
        except Exception:  # noqa: BLE001 - reported to the test process with its traceback
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()
    # Every answer has been read by now; skip the interpreter's seconds-long teardown of torch and triton.
    os._exit(0)


# ----------------------------------------------------------------------------
# In the test process
# ----------------------------------------------------------------------------
class Pool:
    """`world` gloo ranks that run checks on request; close() stops them."""

    def __init__(self, world):
        self.world = world
        context = mp.get_context("spawn")
        self.tasks = [context.Queue() for _ in range(world)]
        self.results = context.Queue()
        self.context = mp.start_processes(_worker, args=(world, free_port(), self.tasks, self.results),
                                          nprocs=world, join=False, start_method="spawn")

    def run(self, name, args, sub_world=None):
        """Run check `name` on the ranks of a group of `sub_world` (default: all of them).

        Returns the values of the group's ranks, in rank order, or raises with the failing ranks' tracebacks.
        """
        sub_world = self.world if sub_world is None else sub_world
        for rank in range(self.world):
            self.tasks[rank].put((name, sub_world, args))
        answers, waited = {}, 0
        while len(answers) < self.world:
            try:
                rank, status, value = self.results.get(timeout=1)
            except queue.Empty:
                waited += 1
                dead = [p.pid for p in self.context.processes if p.exitcode is not None]
                if dead or waited >= RESULT_TIMEOUT_S:
                    raise AssertionError(f"{name}{args}: answers from ranks {sorted(answers)} only, after {waited} s; "
                                         f"processes {dead} have exited (deadlock if none)") from None
                continue
            answers[rank] = (status, value)
        failed = {rank: value for rank, (status, value) in answers.items() if status != "ok"}
        if failed:
            raise AssertionError(f"{name}{args} failed on ranks {sorted(failed)}:\n" + "\n".join(failed.values()))
        values = [torch.load(io.BytesIO(answers[rank][1])) for rank in range(self.world)]
        return [value for value in values if value is not None]

    def close(self):
        for rank in range(self.world):
            self.tasks[rank].put(None)
        while not self.context.join(timeout=RESULT_TIMEOUT_S):  # join returns as each process ends
            pass
