"""Masks and biases as compile-time switches of one kernel: what a sliding window saves, what dropout stores.

    python -m tutorial.variants

1. Block skipping, from causal to a sliding window. For each query block the
   kernel asks `_key_range` (kernels/tiles.py) which key blocks some row can
   see; `reference.tiled.band_key_bounds` is the same arithmetic in plain
   Python, and this script counts with it, for causal attention and for a
   window of 1024 keys, at growing N. Causal visits grow as N^2, the window's
   as N * W: doubling N doubles them.
2. Dropout's mask is never stored: the kernels draw it from Philox, a
   counter-based generator, at (seed, head, row, column), so the backward
   pass regenerates exactly the forward's mask. The script draws it twice from
   the same seed through the kernels' own helper and prints how many bytes a
   stored mask would have cost at the largest N.
"""
import os

BLOCK_M, BLOCK_N = 128, 64  # the GPU forward's first config
WINDOW = 1024  # keys each query sees (Mistral's sliding window is 4096)
HEADS = 16


def visited_tiles(n, left, right):
    """(visited, masked) key-block tiles over all query blocks of one head, Nq = Nk = n."""
    from reference.tiled import band_key_bounds

    visited = masked = 0
    for start_m in range(0, n, BLOCK_M):
        lo, full_lo, full_hi, hi = band_key_bounds(start_m, BLOCK_M, BLOCK_N, n, n, left, right)
        blocks = -(-(hi - lo) // BLOCK_N) if hi > lo else 0
        visited += blocks
        masked += blocks - (full_hi - full_lo) // BLOCK_N
    return visited, masked


def main():
    print(f"1. key-block tiles one head visits ({BLOCK_M}x{BLOCK_N} tiles; masked ones in brackets)")
    print(f"{'N':>7} {'causal':>16} {f'window {WINDOW}, causal':>24} {'ratio':>7}")
    for n in (4096, 8192, 16384, 32768, 65536):
        causal, causal_masked = visited_tiles(n, None, 0)
        window, window_masked = visited_tiles(n, WINDOW - 1, 0)
        print(f"{n:>7} {causal:>9} {f'({causal_masked})':>6} {window:>17} {f'({window_masked})':>6} "
              f"{causal / window:>7.1f}")

    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first kernels import
    import torch

    from kernels.flash_attention import dropout_keep_mask

    seed = torch.tensor([1234], dtype=torch.int64)
    # A corner of the mask (2 heads, 64 x 64): the interpreter draws it one program at a time.
    first = dropout_keep_mask(seed, 0.1, 2, 64, 64)
    second = dropout_keep_mask(seed, 0.1, 2, 64, 64)
    n = 65536
    print(f"\n2. dropout p = 0.1: the mask drawn twice from one seed is {'identical' if torch.equal(first, second) else 'DIFFERENT'}"
          f" ({first.float().mean().item():.3f} kept); stored as bits, {HEADS} heads at N = {n} "
          f"would need {HEADS * n * n / 8 / 2**30:.0f} GiB per sequence, regenerated it needs none")


if __name__ == "__main__":
    main()
