"""The context-parallel model's arithmetic (bench/cp_model.py): hand counts, and the threshold it prints."""
from dataclasses import replace

import pytest

from bench import cp_model
from bench.cp_model import (LINKS, Shape, main, ring_hides_communication, ring_hiding_length, ring_step_bytes,
                            ring_step_flops, table, ulysses_bytes, ulysses_comm_over_compute)

TINY = Shape(heads_q=4, heads_kv=2, head_dim=8, batch=3, dtype_bytes=2, causal=False)


def test_ring_step_counts_by_hand():
    # 16 tokens over 4 ranks: shards of 4. Forward: K and V, 3 * 2 * 4 * 8 elements of 2 bytes each.
    assert ring_step_bytes(16, 4, TINY) == 2 * (3 * 2 * 4 * 8) * 2
    # Backward: plus dK and dV in fp32.
    assert ring_step_bytes(16, 4, TINY, "bwd") == 2 * (3 * 2 * 4 * 8) * (2 + 4)
    assert ring_step_flops(16, 4, TINY) == 4 * 3 * 4 * 4 * 4 * 8
    causal = replace(TINY, causal=True)
    assert ring_step_flops(16, 4, causal) == 4 * 3 * 4 * 4 * 2 * 8  # the zigzag step: S x S/2 keys
    assert ring_step_flops(16, 4, causal, "bwd") == 2.5 * ring_step_flops(16, 4, causal)


def test_ulysses_bytes_by_hand():
    # 2 ranks, shards of 8 tokens: each sends half of q, k, v and o (4 + 2 + 2 + 4 heads).
    assert ulysses_bytes(16, 2, TINY) == 0.5 * 3 * 8 * 8 * 2 * (4 + 2 + 2 + 4)
    # 4 ranks but 2 kv heads: k and v are copied up to 4 heads before they are sent.
    assert ulysses_bytes(16, 4, TINY) == 0.75 * 3 * 4 * 8 * 2 * (4 + 4 + 4 + 4)


@pytest.mark.parametrize("mode", ["fwd", "bwd"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("world", [8, 64])
def test_hiding_length_is_the_shortest_that_hides(world, causal, mode):
    shape = Shape(causal=causal)
    for bandwidth in LINKS.values():
        n = ring_hiding_length(world, bandwidth, 400, shape, mode)
        assert n % (2 * world) == 0, "zigzag shards need N divisible by 2 * world"
        assert ring_hides_communication(n, world, bandwidth, 400, shape, mode)
        assert not ring_hides_communication(n - 2 * world, world, bandwidth, 400, shape, mode)


def test_hiding_length_scales_with_world_and_with_throughput_over_bandwidth():
    shape, nvlink = Shape(), LINKS["NVLink-class"]
    base = ring_hiding_length(8, nvlink, 400, shape)
    assert ring_hiding_length(16, nvlink, 400, shape) == pytest.approx(2 * base, rel=0.01)
    assert ring_hiding_length(8, nvlink / 2, 400, shape) == pytest.approx(2 * base, rel=0.01)
    assert ring_hiding_length(8, nvlink, 200, shape) == pytest.approx(base / 2, rel=0.01)
    # Backward: (2 + 2 + 4 + 4) / (2 + 2) = 3x the bytes for 2.5x the flops.
    assert ring_hiding_length(8, nvlink, 400, shape, "bwd") == pytest.approx(1.2 * base, rel=0.01)


def test_ulysses_share_of_time_falls_as_the_sequence_grows():
    shape, ib = Shape(), LINKS["InfiniBand-class"]
    assert ulysses_comm_over_compute(2**21, 8, ib, 400, shape) == pytest.approx(
        ulysses_comm_over_compute(2**20, 8, ib, 400, shape) / 2)


def test_table_is_labelled_a_model_and_covers_every_link_and_world(capsys):
    text = table()
    assert text.startswith("Model, not a measurement")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "GB/s" in line]
    assert len(rows) == len(LINKS) * len(cp_model.WORLDS)
    assert "n/a (32 heads < 64)" in text  # Ulysses cannot split 32 heads over 64 ranks
    main(["--heads", "64:8"])
    assert "n/a" not in capsys.readouterr().out
