"""A model on paper, not a measurement: when does context-parallel attention hide its communication?

    python -m bench.cp_model                       # the README's table
    python -m bench.cp_model --tflops 250 --heads 64:8 --n 262144

No GPU has run this project's kernels, so the attention throughput is an
assumed figure (--tflops, default 400 TFLOP/s per GPU, the same for forward
and backward), and the links are nominal: NVLink-class 450 GB/s and
InfiniBand-class 50 GB/s per GPU and direction. Everything below scales with
their ratio.

Per rank, with S = N / world tokens on each, B batch, H query heads, Hkv kv
heads, head dim D and b bytes per element (2 for bf16):

  ring, one step  sends one K and one V shard:   2 B Hkv S D b bytes
                  computes, after step 0, one S x S block (causal zigzag: S x S/2)
                  of attention, 4 B H S S D flops (halved when causal).
                  The next hop travels while this step computes, so the ring
                  hides its communication once bytes / bandwidth <= flops /
                  throughput. Bytes grow with S and flops with S^2: above one
                  shard length S* it always does, and N* = world * S*.
                  world - 1 steps in all, so 2 (world - 1) shards of K and V.
                  A ring that spans nodes goes at the pace of its slowest hop:
                  read the InfiniBand-class rows for it.
  ring, backward  sends K and V (b bytes each) and the fp32 dK and dV
                  accumulators (4 bytes each); computes 2.5x the forward's flops.
  Ulysses         four all-to-alls (q, k and v in, o out); a rank keeps 1/world
                  of each and sends the rest: (world - 1) / world * B S D b
                  (2 H + 2 max(Hkv, world)) bytes (kv heads are copied up to
                  world). They are not overlapped: attention needs the whole
                  sequence first. It needs H divisible by world.
"""
import argparse
import math
from dataclasses import dataclass

from .flops import attention_flops

ASSUMED_TFLOPS = 400.0  # per GPU, attention forward or backward: an assumption, not a measurement
LINKS = {"NVLink-class": 450e9, "InfiniBand-class": 50e9}  # bytes/s per GPU, each direction
WORLDS = (8, 16, 32, 64)
FP32_BYTES = 4  # the backward's dK/dV accumulators travel in fp32


@dataclass(frozen=True)
class Shape:
    """The attention being parallelised; the default is Llama-3-8B-like (32 query heads over 8 kv heads)."""
    heads_q: int = 32
    heads_kv: int = 8
    head_dim: int = 128
    batch: int = 1
    dtype_bytes: int = 2
    causal: bool = True


def ring_step_bytes(n, world, shape, mode="fwd"):
    """Bytes a rank sends in one ring step: a K and a V shard (and, backward, their fp32 dK and dV)."""
    per_element = 2 * shape.dtype_bytes + (2 * FP32_BYTES if mode == "bwd" else 0)
    return shape.batch * shape.heads_kv * (n / world) * shape.head_dim * per_element


def ring_step_flops(n, world, shape, mode="fwd"):
    """Flops of one ring step after step 0: S x S keys, or S x S/2 under the causal zigzag schedule."""
    s = n / world
    return attention_flops(shape.batch, shape.heads_q, s, s / 2 if shape.causal else s, shape.head_dim, mode=mode)


def ring_hides_communication(n, world, bandwidth, tflops, shape, mode="fwd"):
    """Whether one step's send takes no longer than its computation."""
    send_s = ring_step_bytes(n, world, shape, mode) / bandwidth
    return send_s <= ring_step_flops(n, world, shape, mode) / (tflops * 1e12)


def ring_hiding_length(world, bandwidth, tflops, shape, mode="fwd"):
    """The shortest N (a multiple of 2 * world, for zigzag shards) at which the ring hides its communication.

    Send time is a S / bandwidth and compute time c S^2 / throughput, with
    S = N / world, so S* = (a / bandwidth) / (c / throughput).
    """
    a = ring_step_bytes(world, world, shape, mode)  # bytes per token of shard (S = 1)
    c = ring_step_flops(world, world, shape, mode)  # flops per token of shard, squared (S = 1)
    s_star = (a / bandwidth) / (c / (tflops * 1e12))
    return 2 * world * math.ceil(s_star * world / (2 * world))


def ulysses_bytes(n, world, shape):
    """Bytes a rank sends in Ulysses' four all-to-alls (q, k, v, o) in the forward pass."""
    heads = 2 * shape.heads_q + 2 * max(shape.heads_kv, world)
    return (world - 1) / world * shape.batch * (n / world) * shape.head_dim * shape.dtype_bytes * heads


def ulysses_comm_over_compute(n, world, bandwidth, tflops, shape):
    """Ulysses' all-to-all time over its attention time (forward); they add up, since nothing overlaps."""
    flops = attention_flops(shape.batch, shape.heads_q / world, n, n, shape.head_dim, causal=shape.causal)
    return (ulysses_bytes(n, world, shape) / bandwidth) / (flops / (tflops * 1e12))


def _tokens(n):
    return f"{n / 2**20:g}M" if n >= 2**20 and n % 2**14 == 0 else f"{n / 1024:.0f}k" if n >= 10240 else f"{n:,}"


def table(tflops=ASSUMED_TFLOPS, shape=Shape(), n=2**20, worlds=WORLDS, links=LINKS):
    """The model's markdown table, one row per (link, world)."""
    mask = "causal" if shape.causal else "non-causal"
    lines = [
        f"Model, not a measurement: {mask}, B={shape.batch}, {shape.heads_q} query heads over {shape.heads_kv} kv "
        f"heads, D={shape.head_dim}, {8 * shape.dtype_bytes}-bit; attention at an assumed {tflops:g} TFLOP/s "
        f"per GPU; links at nominal bandwidth. N* is the shortest sequence at which each ring step's send is "
        f"no slower than its compute.",
        "",
        f"| link | world | ring N* (fwd) | ring N* (bwd) | ring sends per rank, fwd, N={_tokens(n)} "
        f"| Ulysses sends per rank, fwd, N={_tokens(n)} | Ulysses all-to-all / attention time, N={_tokens(n)} |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, bandwidth in links.items():
        for world in worlds:
            ring = (world - 1) * ring_step_bytes(n, world, shape)
            if shape.heads_q % world:
                ulysses = f"n/a ({shape.heads_q} heads < {world})" if shape.heads_q < world else "n/a"
                ratio = "n/a"
            else:
                ulysses = f"{ulysses_bytes(n, world, shape) / 1e9:.2f} GB"
                ratio = f"{ulysses_comm_over_compute(n, world, bandwidth, tflops, shape):.1%}"
            lines.append(f"| {name} ({bandwidth / 1e9:g} GB/s) | {world} "
                         f"| {_tokens(ring_hiding_length(world, bandwidth, tflops, shape))} "
                         f"| {_tokens(ring_hiding_length(world, bandwidth, tflops, shape, 'bwd'))} "
                         f"| {ring / 1e9:.2f} GB | {ulysses} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.cp_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tflops", type=float, default=ASSUMED_TFLOPS,
                        help=f"assumed attention throughput per GPU (default {ASSUMED_TFLOPS:g}, not measured)")
    parser.add_argument("--heads", default="32:8", help="query heads:kv heads (default 32:8)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype-bytes", type=int, default=2)
    parser.add_argument("--non-causal", action="store_true")
    parser.add_argument("--n", type=int, default=2**20, help="sequence length for the volume columns")
    args = parser.parse_args(argv)
    heads_q, heads_kv = (int(h) for h in args.heads.split(":"))
    shape = Shape(heads_q, heads_kv, args.head_dim, dtype_bytes=args.dtype_bytes, causal=not args.non_causal)
    print(table(args.tflops, shape, args.n))


if __name__ == "__main__":
    main()
