"""One serving step on one paged kernel, on the CPU: block table, tile numbering, host reads, bad data.

    python -m tutorial.serving_step

A serving engine's batch mixes sequences at different stages. This script
builds one step of four sequences (a decode, 4 speculative tokens to verify,
a 40-token chunk of a prompt over its cached prefix, and a whole 20-token
prompt) over a pool of 16-key pages, 8 query heads over 2 kv heads, and
runs it through `kernels.paged_attention` in one call, under Triton's
interpreter (it sets TRITON_INTERPRET=1 unless the variable is set).

1. The block table: which pages of the pool hold each sequence's keys, and
   where key n of sequence b lives (row n % page_size of page
   block_table[b, n // page_size]).
2. The tile numbering. A program owns BLOCK_Q new tokens of one sequence.
   Sequence b's tiles start at cu_seqlens_q[b] // BLOCK_Q + b, which leaves
   room for all of them, so the grid, total_q // BLOCK_Q + B tiles per kv
   head, is known from shapes; `find_sequence` is the kernel's binary search
   (`_find_sequence`) in plain Python. The table lists every tile: its
   sequence, its first new token, or that it returns at once.
3. Host reads. The call runs under `HostReads`, which counts everything that
   makes the host wait for the device (a scalar read or a tensor's truth
   value, `nonzero`, `tolist`, a copy from the GPU): none in the fast path,
   some with validate=True. Then its output against reference.paged in float64.
4. Bad data. One block-table entry points past the pool: that sequence's rows
   come out NaN, the others are untouched; validate=True names the entry.
"""
import math
import os

from torch.utils._python_dispatch import TorchDispatchMode

PAGE_SIZE = 16
HEADS_Q, HEADS_KV, HEAD_DIM = 8, 2, 32
# (keys after the step, new tokens) per sequence: a decode, a verification, a chunk over a prefix, a prompt
STEP = ((300, 1), (64, 4), (140, 40), (20, 20))
NAMES = ("decode", "verify 4", "chunk of 40 over 100", "prompt of 20")
BLOCK_Q = 16  # new tokens per tile, for the picture: a 64-row tile over a group of 4 query heads


def tile_starts(cu_seqlens_q, block_q):
    """The first tile of each sequence: cu_seqlens_q[b] // block_q + b (the kernel's numbering)."""
    return [start // block_q + b for b, start in enumerate(cu_seqlens_q[:-1])]


def find_sequence(starts, tile):
    """The last b with starts[b] <= tile, by binary search: the kernel's _find_sequence."""
    lo, hi = 0, len(starts) - 1
    for _ in range(max(1, (len(starts) - 1).bit_length())):
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if starts[mid] <= tile else (lo, mid - 1)
    return lo


def grid_tiles(cu_seqlens_q, block_q):
    """Tiles per kv head the launcher asks for, from shapes only: total_q // block_q + B."""
    return cu_seqlens_q[-1] // block_q + len(cu_seqlens_q) - 1


class HostReads(TorchDispatchMode):
    """Counts what makes the host wait for the device: each would stall a GPU and cannot be captured in a graph.

    The dispatcher sees scalar reads (`.item()`, `int(t)`, `bool(t)`), `nonzero` and copies from a
    GPU; `tolist()` reads the data without it, so it is counted by wrapping the method.
    """
    SYNCS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero")

    def __enter__(self):
        import torch

        self.reads = []
        self._tolist = torch.Tensor.tolist

        def tolist(tensor):
            self.reads.append("tolist")
            return self._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        import torch

        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        from_gpu = name in ("aten::_to_copy", "aten::copy_") and any(
            getattr(a, "device", None) is not None and a.device.type == "cuda" for a in args[:2]) and (
            kwargs or {}).get("device", args[0].device).type == "cpu"
        if name in self.SYNCS or from_gpu:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def make_step(seed=0):
    """q (total_q, Hq, D), a shuffled pool of pages (the kernel's view of vLLM's layout), table, lengths."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    pages = [math.ceil(n / PAGE_SIZE) for n, _ in STEP]
    order = torch.randperm(sum(pages), generator=gen).to(torch.int32)
    table = torch.zeros(len(STEP), max(pages), dtype=torch.int32)
    start = 0
    for b, p in enumerate(pages):
        table[b, :p] = order[start:start + p]
        start += p
    pool = torch.randn(2, sum(pages), PAGE_SIZE, HEADS_KV, HEAD_DIM, generator=gen)  # K and V, vLLM's layout
    k_cache, v_cache = (t.permute(0, 2, 1, 3) for t in pool)  # -> (num_pages, Hkv, page_size, D), views
    q = torch.randn(sum(new for _, new in STEP), HEADS_Q, HEAD_DIM, generator=gen)
    cu_seqlens_q = torch.tensor([0, *(new for _, new in STEP)]).cumsum(0).to(torch.int32)
    seqused_k = torch.tensor([n for n, _ in STEP], dtype=torch.int32)
    return q, k_cache, v_cache, seqused_k, table, cu_seqlens_q


def main():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first kernels import
    import torch

    import kernels
    import reference.paged as ref

    q, k_cache, v_cache, seqused_k, table, cu_seqlens_q = make_step()
    max_seqlen_q = max(new for _, new in STEP)

    print(f"1. the block table: {k_cache.shape[0]} pages of {PAGE_SIZE} keys, shuffled")
    for b, ((n, new), name) in enumerate(zip(STEP, NAMES)):
        used = table[b, :math.ceil(n / PAGE_SIZE)].tolist()
        print(f"  seq {b} ({name}, {n} keys): pages {used}")
    n = 100
    print(f"  key {n} of seq 2 is row {n % PAGE_SIZE} of page block_table[2, {n // PAGE_SIZE}] = "
          f"{int(table[2, n // PAGE_SIZE])}")

    cu = cu_seqlens_q.tolist()
    starts = tile_starts(cu, BLOCK_Q)
    grid = grid_tiles(cu, BLOCK_Q)
    needed = sum(math.ceil(new / BLOCK_Q) for _, new in STEP)
    print(f"\n2. tiles of BLOCK_Q = {BLOCK_Q} new tokens; cu_seqlens_q = {cu}")
    print(f"  tile_start = cu_seqlens_q[b] // {BLOCK_Q} + b = {starts}")
    print(f"  grid: {cu[-1]} // {BLOCK_Q} + {len(STEP)} = {grid} tiles per kv head, {needed} of them with work")
    for tile in range(grid):
        b = find_sequence(starts, tile)
        first = (tile - starts[b]) * BLOCK_Q
        new = STEP[b][1]
        work = f"new tokens {first}..{min(first + BLOCK_Q, new) - 1}" if first < new else "returns at once"
        print(f"  tile {tile:2}: seq {b}, {work}")

    with torch.no_grad():
        with HostReads() as fast:
            o = kernels.paged_attention(q, k_cache, v_cache, seqused_k, table, cu_seqlens_q=cu_seqlens_q,
                                        max_seqlen_q=max_seqlen_q)
        with HostReads() as checked:
            kernels.paged_attention(q, k_cache, v_cache, seqused_k, table, cu_seqlens_q=cu_seqlens_q,
                                    max_seqlen_q=max_seqlen_q, validate=True)
    expected = ref.paged_attention(q, k_cache, v_cache, seqused_k, table, cu_seqlens_q=cu_seqlens_q,
                                   dtype=torch.float64)
    print("\n3. host reads during one call")
    print(f"  paged_attention: {len(fast.reads)}")
    print(f"  paged_attention(validate=True): {len(checked.reads)} ({', '.join(sorted(set(checked.reads)))})")
    print(f"  max |kernel - float64 reference| = {(o.double() - expected).abs().max().item():.1e}")

    bad = table.clone()
    bad[2, 3] = k_cache.shape[0] + 5  # a page past the pool
    with torch.no_grad():
        o_bad = kernels.paged_attention(q, k_cache, v_cache, seqused_k, bad, cu_seqlens_q=cu_seqlens_q,
                                        max_seqlen_q=max_seqlen_q)
    rows_nan = [b for b in range(len(STEP)) if o_bad[cu[b]:cu[b + 1]].isnan().all()]
    rows_same = [b for b in range(len(STEP)) if torch.equal(o_bad[cu[b]:cu[b + 1]], o[cu[b]:cu[b + 1]])]
    print(f"\n4. block_table[2, 3] = {int(bad[2, 3])}, past the pool's {k_cache.shape[0]} pages")
    print(f"  sequences whose rows are all NaN: {rows_nan}; unchanged: {rows_same}")
    try:
        with torch.no_grad():
            kernels.paged_attention(q, k_cache, v_cache, seqused_k, bad, cu_seqlens_q=cu_seqlens_q,
                                    max_seqlen_q=max_seqlen_q, validate=True)
    except ValueError as exc:
        print(f"  validate=True: ValueError: {exc}")


if __name__ == "__main__":
    main()
