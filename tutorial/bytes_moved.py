"""Why N x N never touches memory, with the bytes counted.

    python -m tutorial.bytes_moved [--head-dim 128] [--bytes-per-element 2] [--block-m 128]

Attention does 4 * N^2 * D FLOPs per head however it is computed; what flash
attention changes is the traffic to HBM (the GPU's main memory). This script
counts that traffic for one head, Nq = Nk = N, no mask, head dim D, and
b bytes per element (bf16: b = 2), from N = 1k to 16k.

Naive attention, in its most favourable form: three kernels, the scale
folded into Q, the softmax one fused kernel, S and P stored in the input dtype.

    S = Q K^T      read Q, K (2 N D b)      write S (N^2 b)
    P = softmax(S) read S (N^2 b)           write P (N^2 b)
    O = P V        read P (N^2 b), V (N D b) write O (N D b)
    total = 4 N D b + 4 N^2 b

Eager PyTorch with a separate scale and masked_fill adds two more N x N round
trips, so real naive code moves more than this.

Flash attention, ideal: Q, K, V read once, O written once, plus the log-sum-exp
the kernel saves per row for the backward pass (fp32, 4 bytes a row):

    total = 4 N D b + 4 N

Flash attention, K and V re-read per query block: the kernel runs one program
per BLOCK_M query rows, and each program streams all of K and V. If no cache
helped, every program would read them from HBM again:

    total = 2 N D b (Q, O) + 4 N + ceil(N / BLOCK_M) * 2 N D b (K, V)

That is quadratic in N again: the ratio to naive tends to
4 N^2 b / (2 N^2 D b / BLOCK_M) = 2 BLOCK_M / D, only 2x at BLOCK_M = D = 128.
Which figure is real depends on the L2 cache that sits between the SMs and
HBM. One head's K and V at N = 16k, bf16, D = 128 are 2 N D b = 8 MiB, well
inside an H100's 50 MB L2, and the programs of one head run at the same time,
so their re-reads hit L2 and HBM sees close to the ideal figure. Naive
attention's S and P are 512 MiB each at that size: no cache holds them, and
every one of their bytes crosses HBM, half of them as writes.
"""
import argparse
import math
from typing import NamedTuple

SEQUENCE_LENGTHS = [1024, 2048, 4096, 8192, 16384]
LSE_BYTES = 4  # the kernel saves one fp32 log-sum-exp per query row
MIB = 2 ** 20


class AttentionBytes(NamedTuple):
    """HBM bytes moved by one head's forward pass (see the module docstring for the model)."""
    qkvo: int  # Q, K, V read once and O written once: 4 N D b
    scores: int  # naive's N x N traffic: write S, read S, write P, read P: 4 N^2 b
    naive: int  # qkvo + scores
    flash: int  # ideal flash: qkvo + the log-sum-exp
    flash_reread: int  # flash when every query block reads K and V from HBM again

    @property
    def ratio(self) -> float:
        """How many times fewer bytes ideal flash attention moves than naive attention."""
        return self.naive / self.flash

    @property
    def ratio_reread(self) -> float:
        """The same, with K and V re-read from HBM by every query block."""
        return self.naive / self.flash_reread


def attention_bytes(n, head_dim, bytes_per_element, block_m) -> AttentionBytes:
    """Bytes naive and flash attention move for one head with Nq = Nk = n, no mask."""
    tensor = n * head_dim * bytes_per_element  # one of Q, K, V, O: (N, D)
    matrix = n * n * bytes_per_element  # one of S, P: (N, N)
    qkvo = 4 * tensor
    scores = 4 * matrix  # S written, S read, P written, P read
    lse = n * LSE_BYTES
    query_blocks = math.ceil(n / block_m)  # the kernel's programs along the queries
    return AttentionBytes(
        qkvo=qkvo,
        scores=scores,
        naive=qkvo + scores,
        flash=qkvo + lse,
        flash_reread=2 * tensor + lse + query_blocks * 2 * tensor,  # Q, O once; K, V once per program
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--bytes-per-element", type=int, default=2, help="2 for bf16/fp16, 4 for fp32")
    parser.add_argument("--block-m", type=int, default=128, help="query rows per program (the GPU forward's BLOCK_M)")
    args = parser.parse_args(argv)
    d, b, block_m = args.head_dim, args.bytes_per_element, args.block_m

    print(f"HBM bytes of one attention head's forward pass: D={d}, {b} bytes per element, "
          f"Nq = Nk = N, no mask, BLOCK_M={block_m}")
    print(f"{'N':>6} {'naive MiB':>11} {'of it S,P':>10} {'flash MiB':>10} {'re-read MiB':>12}"
          f" {'naive/flash':>12} {'naive/re-read':>14}")
    for n in SEQUENCE_LENGTHS:
        c = attention_bytes(n, d, b, block_m)
        print(f"{n:>6} {c.naive / MIB:>11.1f} {c.scores / MIB:>10.1f} {c.flash / MIB:>10.2f} "
              f"{c.flash_reread / MIB:>12.1f} {c.ratio:>11.1f}x {c.ratio_reread:>13.1f}x")
    last = attention_bytes(SEQUENCE_LENGTHS[-1], d, b, block_m)
    kv = 2 * SEQUENCE_LENGTHS[-1] * d * b
    print(f"At N={SEQUENCE_LENGTHS[-1]}: S alone is {last.scores / 4 / MIB:.0f} MiB; naive moves "
          f"{last.ratio:.1f}x the bytes of flash attention.")
    print(f"The re-read column assumes no cache: one head's K and V ({kv / MIB:.0f} MiB) fit in L2, "
          f"so on a GPU HBM sees close to the flash column.")


if __name__ == "__main__":
    main()
