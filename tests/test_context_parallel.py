"""Context-parallel attention: the one-process simulation, then real gloo ranks on localhost.

The simulation (reference/context_parallel.py) is held to naive attention in
float64, tightly. The kernels (kernels/context_parallel.py) run in pools of 2
and 4 processes started once for the whole module (tests/cp_worker.py); a
subgroup of 3 of the 4 covers a world size that is not a power of two, and a
group of one rank covers the degenerate case. Every rank builds the same full
inputs from a seed, shards them, and hands back the gathered output and
gradients, which must obey the tolerance rule against float64 attention on the
full sequence, with PyTorch's own attention in the same dtype as the baseline.
"""
import math
import re
from pathlib import Path

import pytest
import torch

from reference import naive_attention
from reference.context_parallel import (
    check_shardable, context_parallel_attention, merge_partials, ring_attention, ring_attention_backward,
    ring_schedule_table, ring_step, shard_of, shard_sequence, ulysses_attention, unshard_sequence,
)
from tests.cp_worker import CPCase, Pool
from tests.helpers import GRADIENT_FACTOR, assert_close, assert_close_to_reference, attention_lse, sdpa_attention


# ----------------------------------------------------------------------------
# The simulation, in one process
# ----------------------------------------------------------------------------
def full_inputs(world, h_q, h_kv, chunk=3, head_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = 2 * world * chunk
    return [torch.randn(2, h, n, head_dim, generator=generator, dtype=torch.float64) for h in (h_q, h_kv, h_kv, h_q)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("zigzag", [True, False])
def test_shard_unshard_roundtrip_and_zigzag_positions(world, zigzag):
    positions = torch.arange(4 * world)
    shards = shard_sequence(positions.view(1, 1, -1, 1), world, zigzag=zigzag)
    assert torch.equal(unshard_sequence(shards, zigzag=zigzag).flatten(), positions)
    chunk = 2 if zigzag else 4
    for rank, shard in enumerate(shards):
        owned = [rank, 2 * world - 1 - rank] if zigzag else [rank]
        expected = torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in owned])
        assert torch.equal(shard.flatten(), expected), f"rank {rank} holds {shard.flatten().tolist()}"


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_zigzag_ring_schedule_covers_each_visible_pair_once_with_equal_work(world):
    """Summed over the steps, each rank computes every (query, key) pair the causal mask allows, exactly once."""
    n = 2 * world * 2
    positions = shard_sequence(torch.arange(n).view(1, 1, n, 1), world)
    for rank in range(world):
        count = torch.zeros(n, n, dtype=torch.long)
        work = []
        for step in range(world):
            src, rows, cols, masked = ring_step(rank, step, world, True, 4)
            q_pos, k_pos = positions[rank].flatten()[rows], positions[src].flatten()[cols]
            block = torch.ones(len(q_pos), len(k_pos), dtype=torch.long)
            if masked:  # the mask inside a block compares local order; it must agree with global order
                block = block.tril()
            count[q_pos[:, None], k_pos[None, :]] += block
            work.append(block.sum().item())
        mine = positions[rank].flatten()
        expected = torch.ones(n, n, dtype=torch.long).tril()[mine]
        assert torch.equal(count[mine], expected), f"rank {rank}: wrong pairs computed"
        assert len(set(work[1:])) <= 1, f"rank {rank}: unequal work after step 0: {work}"


def table_totals(table):
    """The per-rank totals and the critical path (sum of each step's slowest rank) from the table's last line."""
    *per_rank, critical = (float(cell) for cell in table.splitlines()[-1].split("|")[1:])
    return per_rank, critical


def test_schedule_table_shows_zigzag_balanced_and_contiguous_not():
    zigzag, contiguous = ring_schedule_table(4), ring_schedule_table(4, zigzag=False)
    assert len(zigzag.splitlines()) == 4 + 4 + 1  # title, legend, header, rule, 4 steps, total
    per_rank, critical = table_totals(zigzag)
    assert len(set(per_rank)) == 1 and critical == per_rank[0], zigzag
    per_rank_c, critical_c = table_totals(contiguous)
    assert sum(per_rank_c) == sum(per_rank), "both layouts do the same total work"
    assert critical_c == max(per_rank_c) > critical, contiguous


def test_tutorial_draws_the_tables_the_function_prints():
    tutorial = (Path(__file__).resolve().parent.parent / "kernels" / "README.md").read_text()
    for table in (ring_schedule_table(4), ring_schedule_table(4, zigzag=False)):
        assert f"```text\n{table}\n```" in tutorial, table


def test_merge_partials_is_exact_and_never_nan():
    q, k, v, _ = full_inputs(1, 2, 2, chunk=4)
    o64 = naive_attention(q, k, v)
    halves = [(k[:, :, s], v[:, :, s]) for s in (slice(0, 3), slice(3, None))]
    parts = [naive_attention(q, kh, vh) for kh, vh in halves]
    lses = [attention_lse(q, kh, vh, False, 1 / math.sqrt(q.shape[-1]), torch.float64) for kh, vh in halves]
    o, lse = merge_partials(parts[0], lses[0], parts[1], lses[1])
    assert_close(o, o64, "merged output")
    # A row that has seen no key (lse = -inf) on both sides stays 0 and -inf, with no NaN.
    minus_inf = torch.full_like(lse, float("-inf"))
    o_none, lse_none = merge_partials(torch.zeros_like(o), minus_inf, torch.zeros_like(o), minus_inf)
    assert torch.all(o_none == 0) and torch.all(lse_none == float("-inf"))
    o_one, _ = merge_partials(torch.zeros_like(o), minus_inf, parts[0], lses[0])
    assert torch.equal(o_one, parts[0])


SIM_CASES = [  # (world, h_q, h_kv): one rank, MHA, GQA, MQA at a world that is not a power of two
    (1, 2, 1), (2, 2, 2), (3, 6, 3), (4, 4, 2), (4, 4, 1),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("world, h_q, h_kv", SIM_CASES)
def test_simulated_ring_matches_naive_forward_and_backward(world, h_q, h_kv, causal):
    q, k, v, do = full_inputs(world, h_q, h_kv)
    shards = [shard_sequence(t, world, zigzag=causal) for t in (q, k, v, do)]
    o, lse = ring_attention(*shards[:3], causal)
    assert_close(unshard_sequence(o, zigzag=causal), naive_attention(q, k, v, causal), "ring output")
    lse64 = attention_lse(q, k, v, causal, 1 / math.sqrt(q.shape[-1]), torch.float64)
    assert_close(unshard_sequence(lse, zigzag=causal), lse64, "ring lse")

    grads = ring_attention_backward(shards[3], *shards[:3], o, lse, causal)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    naive_attention(*leaves, causal).backward(do)
    for name, grad, leaf in zip(("dq", "dk", "dv"), grads, leaves):
        assert_close(unshard_sequence(grad, zigzag=causal), leaf.grad, f"ring {name}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("world, h_q, h_kv", [c for c in SIM_CASES if c[1] % c[0] == 0])
def test_simulated_ulysses_matches_naive(world, h_q, h_kv, causal):
    q, k, v, _ = full_inputs(world, h_q, h_kv)
    shards = [shard_sequence(t, world, zigzag=False) for t in (q, k, v)]
    o, lse = context_parallel_attention(*shards, causal=causal, strategy="ulysses", return_lse=True)
    assert_close(unshard_sequence(o, zigzag=False), naive_attention(q, k, v, causal), "ulysses output")
    lse64 = attention_lse(q, k, v, causal, 1 / math.sqrt(q.shape[-1]), torch.float64)
    assert_close(unshard_sequence(lse, zigzag=False), lse64, "ulysses lse")


def test_simulation_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"x.shape\[2\] = 10 must be divisible by 2 \* world = 4"):
        check_shardable(10, 2, zigzag=True)
    with pytest.raises(ValueError, match=r"x.shape\[1\] = 5 must be divisible by world = 2"):
        shard_of(torch.zeros(1, 5), 0, 2, dim=1, zigzag=False)
    with pytest.raises(ValueError, match=r"k.shape\[1\] = 3"):
        ulysses_attention(*[[torch.zeros(1, h, 2, 4)] * 2 for h in (6, 3, 3)])
    with pytest.raises(ValueError, match=r"q.shape\[2\] = 5 must be even"):
        ring_attention(*[[torch.zeros(1, 1, 5, 4)] * 2] * 3, causal=True)
    with pytest.raises(ValueError, match="strategy must be one of"):
        context_parallel_attention([torch.zeros(1, 1, 2, 4)] * 3, [torch.zeros(1, 1, 2, 4)] * 3,
                                   [torch.zeros(1, 1, 2, 4)] * 3, strategy="tree")


# ----------------------------------------------------------------------------
# Real processes: gloo on localhost, the kernels under the interpreter
# ----------------------------------------------------------------------------
f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

CP_CASES = [
    # Two ranks, each strategy causal and not, MHA and GQA, over the dtypes.
    CPCase(2, "ring", True, 2, 2, f32),  # the zigzag schedule at its smallest
    CPCase(2, "ring", True, 4, 2, bf16, transposed_grad=True),  # GQA sent as is; the backward gets a strided dO
    CPCase(2, "ring", False, 2, 2, f16, return_lse=True),  # the lse's gradient joins each step's delta
    CPCase(2, "ring", False, 4, 2, f32, batch=2),  # batch 2: every shard and message keeps the batch dimension
    CPCase(2, "ulysses", True, 2, 2, f32, transposed_grad=True),  # the all-to-all of a transposed gradient
    CPCase(2, "ulysses", True, 4, 2, bf16),  # Hkv divisible by the world: kv heads split, not copied
    CPCase(2, "ulysses", False, 2, 1, f32),  # MQA: the one kv head replicated up to the world size
    CPCase(2, "ulysses", False, 4, 2, f16, return_lse=True),  # the lse's all-to-all and its gradient
    # A group of one rank: no message at all.
    CPCase(1, "ring", True, 4, 2, f32),
    CPCase(1, "ulysses", True, 2, 1, f32),
    # Four ranks.
    CPCase(4, "ring", True, 2, 2, f32, chunk=2),  # both kinds of zigzag step (earlier and later shards)
    CPCase(4, "ring", True, 4, 2, f16, chunk=2, transposed_grad=True),
    CPCase(4, "ring", False, 4, 1, bf16, chunk=2),  # MQA: one kv head travels
    CPCase(4, "ring", False, 4, 2, f32, chunk=2, return_lse=True),  # dK/dV accumulators make 4 hops
    CPCase(4, "ulysses", True, 4, 4, f32, chunk=2, head_dim=24),  # a head dim that is not a power of two
    CPCase(4, "ulysses", True, 4, 2, bf16, chunk=2, transposed_grad=True),  # Hkv 2 < 4: each kv head twice
    CPCase(4, "ulysses", False, 4, 1, f16, chunk=2),  # MQA over 4 ranks: four copies
    CPCase(4, "ulysses", False, 4, 4, f32, chunk=2, return_lse=True),  # one head per rank
    # Three of the four ranks (a subgroup without rank 0): 6 zigzag chunks.
    CPCase(3, "ring", True, 2, 1, f32),  # an odd ring: group ranks 0..2 are global ranks 1..3
    CPCase(3, "ring", False, 3, 3, bf16),
    CPCase(3, "ulysses", True, 3, 1, f32),  # one kv head replicated to 3
    CPCase(3, "ulysses", False, 6, 3, f16, transposed_grad=True),  # Hkv 3 divisible by the world: no copies
]
POOL_OF = {1: 2, 2: 2, 3: 4, 4: 4}  # which pool runs a world size (3 and 1 are subgroups)


@pytest.fixture(scope="module")
def pools():
    """Pools of 2 and 4 ranks, started together once for the module (the 4 boot while the 2 work)."""
    started = {world: Pool(world) for world in (2, 4)}
    yield started.__getitem__
    for pool in started.values():
        pool.close()


def run_case(pools, case):
    values = pools(POOL_OF[case.world]).run("attention", case, sub_world=case.world)
    assert len(values) == (POOL_OF[case.world] if case.world == 1 else case.world)
    return values[0]


def references(case, dtype):
    """Output, lse and gradients of plain attention on the full sequence, in `dtype`, by autograd."""
    q, k, v, do = case.inputs()
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    o = naive_attention(*leaves, causal=case.causal)
    loss = (o * do.to(dtype)).sum()
    lse = None
    if case.return_lse:
        lse = attention_lse(*leaves, case.causal, 1 / math.sqrt(case.head_dim), dtype)
        loss = loss + lse.sum()
    loss.backward()
    return o.detach(), lse, [t.grad for t in leaves]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CP_CASES])
def test_gathered_output_and_gradients_match_full_attention(pools, case):
    got = run_case(pools, case)
    o64, lse64, grads64 = references(case, torch.float64)
    o_torch, _, grads_torch = references(case, case.dtype)
    assert got["o"].dtype == case.dtype
    assert_close_to_reference(got["o"], o64, o_torch, name="o vs naive")
    q, k, v, _ = case.inputs()
    assert_close_to_reference(got["o"], o64, sdpa_attention(q, k, v, case.causal, 1 / math.sqrt(case.head_dim)),
                              name="o vs SDPA")
    if case.return_lse:
        lse32 = attention_lse(q, k, v, case.causal, 1 / math.sqrt(case.head_dim), torch.float32)
        assert_close_to_reference(got["lse"], lse64, lse32, name="lse")
    for name, grad, grad64, grad_torch in zip(("dq", "dk", "dv"), got["grads"], grads64, grads_torch):
        assert grad.dtype == case.dtype
        assert_close_to_reference(grad, grad64, grad_torch, factor=GRADIENT_FACTOR, name=name)


@pytest.mark.parametrize("case", [CPCase(2, "ring", True, 4, 2, bf16), CPCase(4, "ulysses", True, 4, 2, f16,
                                                                              chunk=2)], ids=lambda c: c.id)
def test_deterministic(pools, case):
    """The same inputs give bitwise the same output and gradients: fixed summation orders, no atomics."""
    first, second = run_case(pools, case), run_case(pools, case)
    for a, b in zip([first["o"], *first["grads"]], [second["o"], *second["grads"]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("world, zigzag, dim", [(2, True, 2), (4, False, 1), (3, True, -1)])
def test_shard_and_unshard_with_strided_gradients(pools, world, zigzag, dim):
    """Shard, then unshard, is the identity; a transposed-view gradient gathers back into the full one."""
    for value in pools(POOL_OF[world]).run("shard_roundtrip", (zigzag, dim), sub_world=world):
        assert value == {"roundtrip": True, "shard": True, "shard_grad": True}


ERRORS = [  # (kind, error type, what the message must say), on 2 ranks
    ("lengths", "ValueError", "q has 6 tokens, k and v 4"),
    ("odd_zigzag", "ValueError", r"q.shape\[2\] = 5 must be even"),
    ("shard_zigzag", "ValueError", r"x.shape\[2\] = 6 must be divisible by 2 \* world = 4"),
    ("shard_contiguous", "ValueError", r"x.shape\[2\] = 5 must be divisible by world = 2"),
    ("shard_dim", "ValueError", "dim = 4 is out of range for x"),
    ("ulysses_q_heads", "ValueError", r"q.shape\[1\] = 3 must be divisible by the world size 2"),
    ("ulysses_kv_heads", "ValueError", r"k.shape\[1\] = 3 to be divisible by the world size 2"),
    ("strategy", "ValueError", "strategy must be one of"),
]


@pytest.mark.parametrize("kind, error, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_input_gets_a_clear_error_on_every_rank(pools, kind, error, message):
    for got_error, got_message in pools(2).run("error", kind):
        assert got_error == error, got_message
        assert re.search(message, got_message), got_message
