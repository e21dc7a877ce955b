"""Paged attention (kernels/paged.py) for every serving step, against float64, its plain twin, and bad input.

One kernel takes decode steps, speculative tokens, prefill chunks over a
cached prefix and whole prompts, in one packed batch or dense, over a
contiguous or paged cache of any page size: each case of PAGED_CASES says
which. The float64 reference is reference/paged.py, one sequence at a time.
"""
import math

import pytest
import torch
import triton
import triton.language as tl

import kernels.runtime
import reference.decode as ref_decode
import reference.paged as ref
from conftest import DEVICE
from kernels import append_kv, decode_attention, paged_attention
from kernels.paged import MAX_SPLIT_QUERIES, _paged_fwd, choose_num_splits
from kernels.tiles import _e4m3_to_float
from tests.cases import PAGED_CASES, PagedCase, dtype_params
from tests.helpers import assert_close_to_reference, poisoned_like

TENSORS = ("k_cache", "v_cache", "seqused_k", "block_table")


def reference_call(inputs, case, dtype=None, **overrides):
    options = dict(case.kwargs(inputs["q"].device), **overrides)
    return ref.paged_attention(inputs["q"], *(inputs[name] for name in TENSORS), cu_seqlens_q=inputs["cu_seqlens_q"],
                               causal=case.causal, cache_leftpad=inputs["cache_leftpad"], return_lse=True,
                               dtype=dtype, **options)


def run_poisoned(inputs, case):
    """The launcher, writing into NaN-filled outputs and partials: an unwritten element fails the test."""
    from kernels.flash_attention import _window_bounds

    q = inputs["q"]
    options = case.kwargs(q.device)
    window = _window_bounds(options.pop("window_size", None), case.causal)
    lse_shape = (q.shape[1], q.shape[0]) if case.packed else q.shape[:3]
    slots = (case.num_splits or 1, len(case.seqlens), MAX_SPLIT_QUERIES, q.shape[-2 if case.packed else 1])
    return _paged_fwd(q, *(inputs[name] for name in TENSORS), inputs["cu_seqlens_q"], inputs["max_seqlen_q"],
                      case.causal, 1.0 / math.sqrt(q.shape[-1]), window, options.get("softcap", 0.0),
                      options.get("alibi_slopes"), options.get("sinks"), inputs["cache_leftpad"], case.num_splits,
                      o=poisoned_like(q), lse=poisoned_like(q, shape=lse_shape, dtype=torch.float32),
                      o_part=poisoned_like(q, shape=(*slots, q.shape[-1]), dtype=torch.float32),
                      lse_part=poisoned_like(q, shape=slots, dtype=torch.float32))


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in PAGED_CASES])
def test_paged_attention_matches_float64(case, dtype, device):
    inputs = case.make_inputs(dtype, device)
    with torch.no_grad():
        if case.num_splits is None:  # the public function's own choice of tiles and splits
            o, lse = paged_attention(inputs["q"], *(inputs[name] for name in TENSORS),
                                     cu_seqlens_q=inputs["cu_seqlens_q"], max_seqlen_q=inputs["max_seqlen_q"],
                                     causal=case.causal, cache_leftpad=inputs["cache_leftpad"], return_lse=True,
                                     validate=True, **case.kwargs(device))
        else:
            o, lse = run_poisoned(inputs, case)
    o64, lse64 = reference_call(inputs, case, torch.float64)
    o_torch, _ = reference_call(inputs, case)  # PyTorch's own, in `dtype`
    assert_close_to_reference(o, o64, o_torch, name=f"o ({dtype})")
    lse32 = reference_call(inputs, case, torch.float32)[1]
    assert_close_to_reference(lse, lse64, lse32, name=f"lse ({dtype})")
    assert o.dtype == dtype and lse.dtype == torch.float32 and o.shape == inputs["q"].shape


def test_decode_attention_is_the_dense_paged_attention(device):
    """The decode API: dense q, cache_seqlens; int64 indices and a custom scale give the same thing."""
    case = PAGED_CASES[1]
    inputs = case.make_inputs(torch.float32, device)
    q, k, v, seqlens, table = inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["seqused_k"], \
        inputs["block_table"]
    with torch.no_grad():
        o = decode_attention(q, k, v, seqlens, table, causal=False, num_splits=2)
        assert torch.equal(o, paged_attention(q, k, v, seqlens, table, causal=False, num_splits=2))
        assert torch.equal(decode_attention(q, k, v, seqlens.long(), table.long(), causal=False, num_splits=2), o)
        scaled = decode_attention(q, k, v, seqlens, table, causal=False, sm_scale=0.3)
    expected = ref.paged_attention(q, k, v, seqlens, table, causal=False, sm_scale=0.3, dtype=torch.float64)
    assert_close_to_reference(scaled, expected, ref.paged_attention(q, k, v, seqlens, table, causal=False,
                                                                    sm_scale=0.3))


def test_the_plain_split_and_merge_blueprint_equals_one_pass(device):
    """reference/decode.py: splitting the keys and merging by lse changes nothing but rounding."""
    inputs = PAGED_CASES[0].make_inputs(torch.float64, device)
    q, k, v, seqlens = inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["seqused_k"]
    whole = ref_decode.decode_attention(q, k, v, seqlens, None, True, return_lse=True)
    for splits in (2, 5, 40):
        split = ref_decode.decode_attention(q, k, v, seqlens, None, True, return_lse=True, num_splits=splits)
        torch.testing.assert_close(split, whole, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("num_splits", [1, 3], ids=["written-by-the-split-kernel", "written-by-the-merge"])
def test_bf16_output_is_rounded_to_nearest(num_splits, device):
    """The fp32 result is far more exact than bf16, so rounding it to nearest gives the float64 result
    rounded to bf16 almost everywhere; truncation (the interpreter's own cast) would match half the time."""
    inputs = PAGED_CASES[0].make_inputs(torch.bfloat16, device)
    q, k, v, seqlens = inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["seqused_k"]
    with torch.no_grad():
        o = decode_attention(q, k, v, seqlens, num_splits=num_splits)
    rounded = ref.paged_attention(q, k, v, seqlens, dtype=torch.float64).to(torch.bfloat16)
    agree = (o == rounded).double().mean().item()
    assert agree > 0.95, f"only {agree:.0%} of the outputs are the float64 result rounded to bf16"


def test_num_splits_heuristic():
    # B = 1, 8 kv heads at 128k keys: 8 programs cannot fill 132 SMs, so split.
    assert choose_num_splits(8, 128 * 1024, 132) > 8
    # B = 64 x 8 kv heads: 512 programs already fill the GPU (3.9 waves).
    assert choose_num_splits(512, 128 * 1024, 132) == 1
    # Short caches are not cut below MIN_KEYS_PER_SPLIT keys per split.
    assert choose_num_splits(8, 300, 132) == 2
    assert choose_num_splits(8, 1, 132) == 1


def test_a_mixed_batch_splits_its_short_steps_and_not_its_chunks(monkeypatch, device):
    """Split-KV is for few new tokens per sequence: in one launch, a decode over 2000 keys and 4 speculative
    tokens split (the merge combines them), a 40-token chunk runs in its own tiles, written directly."""
    seen = []
    real = kernels.paged._paged_merge

    class CountingMerge:
        def __getitem__(self, grid):
            seen.append(grid)
            return real[grid]

    monkeypatch.setattr(kernels.paged, "_paged_merge", CountingMerge())
    case = PagedCase(seqlens=(2000, 600, 100), h_q=4, h_kv=2, new=(1, 4, 40), head_dim=16, causal=True,
                     num_splits=4, options=(("sinks", None),))
    inputs = case.make_inputs(torch.float32, device)
    with torch.no_grad():
        o, lse = run_poisoned(inputs, case)
    assert len(seen) == 1, "the split sequences need one merge"
    o64, lse64 = reference_call(inputs, case, torch.float64)
    assert_close_to_reference(o, o64, reference_call(inputs, case)[0], name="o")
    assert_close_to_reference(lse, lse64, reference_call(inputs, case, torch.float32)[1], name="lse")


@pytest.mark.parametrize("num_splits", [1, 3])
def test_a_tree_of_speculative_tokens_through_a_mask_mod(num_splits, device):
    """Verification of a token tree: each draft token sees the cache and its ancestors in the tree
    (kernels.mods.tree), whatever each sequence's cached length; against float64 over the same mask."""
    from kernels import mods

    parents = [-1, 0, 0, 1, 2, 2]  # a root, two children, their children
    n = len(parents)
    ancestors = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            ancestors[i, j], j = True, parents[j]
    case = PagedCase(seqlens=(40, 300), h_q=4, h_kv=2, new=n, head_dim=32, causal=False, num_splits=num_splits,
                     block_size=16)
    inputs = case.make_inputs(torch.float32, device)
    q, k, v, seqlens, table = (inputs[name] for name in ("q", "k_cache", "v_cache", "seqused_k", "block_table"))
    with torch.no_grad():
        o = decode_attention(q, k, v, seqlens, table, causal=False, num_splits=num_splits,
                             mask_mod=mods.tree(ancestors.to(device)))
    for b, length in enumerate(case.seqlens):
        visible = torch.cat([torch.ones(n, length - n, dtype=torch.bool), ancestors], 1).to(device)
        keys = [ref.sequence_keys(cache, b, 0, length, table)[None] for cache in (k, v)]
        expected = naive_attention_masked(q[b:b + 1], *keys, visible)
        assert_close_to_reference(o[b:b + 1], expected.to(torch.float64),
                                  naive_attention_masked(q[b:b + 1], *keys, visible, torch.float32), name=f"o[{b}]")


def naive_attention_masked(q, k, v, visible, dtype=torch.float64):
    """softmax(q k^T / sqrt(D), masked) v over a (Nq, Nk) bool mask, GQA by repeating k and v."""
    from reference.functional import repeat_kv

    q, k, v = (t.to(dtype) for t in (q, k, v))
    k, v = (repeat_kv(t, q.shape[1] // t.shape[1]) for t in (k, v))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v


# ----------------------------------------------------------------------------
# Bad data: NaN rows for that sequence, never an out-of-bounds read; validate=True names it
# ----------------------------------------------------------------------------
def _small(paged=True, new=1):
    case = PagedCase(seqlens=(20, 40), h_q=4, h_kv=2, new=new, head_dim=16, causal=True, num_splits=1,
                     block_size=16 if paged else None)
    inputs = case.make_inputs(torch.float32, DEVICE)
    return inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["seqused_k"], inputs["block_table"]


@pytest.mark.parametrize("bad", ["page past the pool", "negative page", "length past the cache", "negative length"])
def test_bad_data_gives_nan_rows_for_that_sequence_only(bad):
    q, k, v, seqlens, table = _small()
    table, seqlens = table.clone(), seqlens.clone()
    if bad == "page past the pool":
        table[1, 2] = k.shape[0]  # sequence 1 (40 keys) uses pages 0..2
    elif bad == "negative page":
        table[1, 2] = -1
    elif bad == "length past the cache":
        seqlens[1] = 10_000
    else:
        seqlens[1] = -3
    with torch.no_grad():
        o = decode_attention(q, k, v, seqlens, table)
    assert o[1].isnan().all(), f"{bad}: the bad sequence's rows must be NaN"
    assert not o[0].isnan().any(), f"{bad}: the other sequence must be untouched"


def test_validate_names_the_bad_argument():
    q, k, v, seqlens, table = _small()

    def expect(match, *args, **kwargs):
        with torch.no_grad(), pytest.raises(ValueError, match=match):
            decode_attention(*args, validate=True, **kwargs)

    broken = table.clone()
    broken[1, 2] = k.shape[0]
    expect(rf"block_table\[1, 2\] = {k.shape[0]} is not a page of the pool", q, k, v, seqlens, broken)
    expect(r"cache_seqlens\[1\] = 65 is outside \[0, 64\]", q, k, v, torch.tensor([20, 65], device=DEVICE), table)
    q3, k3, v3, seqlens3, _ = _small(paged=False, new=3)
    expect(r"sequence 0 has 3 new tokens but only 2 keys", q3, k3, v3, torch.tensor([2, 40], device=DEVICE))
    expect(r"cache_leftpad\[0\] = 30 is outside \[0, cache_seqlens\[0\] = 20\]", q3, k3, v3, seqlens3,
           cache_leftpad=torch.tensor([30, 0], dtype=torch.int32, device=DEVICE))
    broken = table.clone()
    broken[0, 3] = 10_000  # past sequence 0's 20 keys: never read, so allowed
    with torch.no_grad():
        decode_attention(q, k, v, seqlens, broken, validate=True)


def _expect(error, match, *args, **kwargs):
    with torch.no_grad(), pytest.raises(error, match=match):
        paged_attention(*args, **kwargs)


def test_dtypes_devices_and_index_types_must_match():
    q, k, v, seqlens, table = _small()
    _expect(TypeError, "k_cache has dtype torch.float16 but q has torch.float32", q, k.half(), v.half(), seqlens, table)
    _expect(TypeError, "v_cache has dtype torch.float16 but k_cache has torch.float32", q, k, v.half(), seqlens, table)
    _expect(ValueError, "block_table is on meta", q, k, v, seqlens, table.to("meta"))
    _expect(TypeError, "seqused_k must have dtype torch.int32 or torch.int64", q, k, v, seqlens.float(), table)
    _expect(TypeError, "block_table must have dtype torch.int32 or torch.int64", q, k, v, seqlens, table.float())
    _expect(TypeError, "q has dtype torch.float64; paged attention supports", q.double(), k.double(), v.double(),
            seqlens, table)
    _expect(ValueError, r"cache_leftpad must be a \(2,\) int32 or int64 tensor", q, k, v, seqlens, table,
            cache_leftpad=torch.zeros(3, dtype=torch.int32, device=DEVICE))
    strided = torch.stack([seqlens, seqlens], dim=1)[:, 0]  # the kernel reads index vectors with unit stride
    _expect(ValueError, r"seqused_k must be contiguous, got stride 2", q, k, v, strided, table)


def test_shapes_and_limits_are_checked():
    q, k, v, seqlens, _ = _small(paged=False)
    _expect(ValueError, "q must have rank 4", q[0], k, v, seqlens)
    _expect(ValueError, "k_cache and v_cache must have the same shape", q, k, v[:, :, :10], seqlens)
    _expect(ValueError, "q has batch 1 but seqused_k has 2 sequences", q[:1], k, v, seqlens)
    _expect(ValueError, "q has head_dim 16 but k_cache has 8", q, k[..., :8], v[..., :8], seqlens)
    _expect(ValueError, r"multiple of the number of kv heads", q[:, :3], k, v, seqlens)
    _expect(ValueError, "num_splits must be None or an int >= 1", q, k, v, seqlens, num_splits=0)
    _expect(TypeError, "sm_scale must be a finite float", q, k, v, seqlens, sm_scale=float("nan"))
    _expect(TypeError, "causal must be a bool", q, k, v, seqlens, causal="no")
    packed = q[:, :, 0]  # (2, Hq, D): two tokens, packed
    _expect(ValueError, r"q must have rank 3, \(total_q, Hq, D\) with cu_seqlens_q", q, k, v, seqlens,
            cu_seqlens_q=torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE), max_seqlen_q=1)
    _expect(TypeError, "max_seqlen_q must be a non-negative int", packed, k, v, seqlens,
            cu_seqlens_q=torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE))
    _expect(ValueError, r"cu_seqlens_q must be a \(3,\) int32 tensor", packed, k, v, seqlens,
            cu_seqlens_q=torch.tensor([0, 2], dtype=torch.int32, device=DEVICE), max_seqlen_q=2)


def test_gradients_are_refused_and_cpu_needs_the_interpreter(monkeypatch):
    q, k, v, seqlens, _ = _small(paged=False)
    with pytest.raises(ValueError, match="no backward pass"):
        decode_attention(q.clone().requires_grad_(), k, v, seqlens)
    monkeypatch.setattr(kernels.runtime, "INTERPRET", False)
    with torch.no_grad(), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        decode_attention(q.cpu(), k.cpu(), v.cpu(), seqlens.cpu())


# ----------------------------------------------------------------------------
# append_kv
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged-vllm-view"])
def test_append_kv_writes_each_sequence_at_its_length(paged, device):
    h_kv, d, n_new = 2, 8, 3
    lengths = [5, 0, 14]  # the third sequence crosses a block edge
    if paged:
        case = PagedCase(seqlens=(16, 16, 32), h_q=2, h_kv=h_kv, new=1, head_dim=d, causal=True, num_splits=1,
                         block_size=16, vllm_pool=True)
        inputs = case.make_inputs(torch.float32, device)
        k, v, table = inputs["k_cache"], inputs["v_cache"], inputs["block_table"]
    else:
        k, v, table = torch.zeros(3, h_kv, 20, d, device=device), torch.zeros(3, h_kv, 20, d, device=device), None
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    k_new, v_new = torch.randn(2, 3, h_kv, n_new, d, device=device)
    k_before = k.clone()
    new = append_kv(k, v, k_new, v_new, seqlens, table)
    assert new.tolist() == [n + n_new for n in lengths] and new.dtype == torch.int32
    for b, n in enumerate(lengths):
        got_k = ref_decode.gather_cache(k, b, n + n_new, table)
        got_v = ref_decode.gather_cache(v, b, n + n_new, table)
        assert torch.equal(got_k[:, n:], k_new[b]) and torch.equal(got_v[:, n:], v_new[b])
        assert torch.equal(got_k[:, :n], ref_decode.gather_cache(k_before, b, n, table)), "earlier rows must be kept"


def test_append_kv_checks_capacity_and_blocks(device):
    """validate=True reads the lengths, offsets and block table on the host and names what is wrong."""
    k = v = torch.zeros(2, 1, 8, 4, device=device)
    new = torch.zeros(2, 1, 3, 4, device=device)
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 7: appending 3 token\(s\) passes .* capacity of 8"):
        append_kv(k, v, new, new, torch.tensor([0, 7], device=device), validate=True)
    pool = torch.zeros(4, 1, 16, 4, device=device)
    table = torch.tensor([[0, 1], [2, 9]], dtype=torch.int32, device=device)  # 9 is not a block of 4
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 9 is not a block of the pool"):
        append_kv(pool, pool, new, new, torch.tensor([0, 15], device=device), table, validate=True)
    packed = torch.zeros(5, 1, 4, device=device)
    with pytest.raises(ValueError, match=r"cu_seqlens_new must start at 0, never decrease and end at the 5"):
        append_kv(k, v, packed, packed, torch.tensor([0, 0], device=device),
                  cu_seqlens_new=torch.tensor([0, 3, 4], device=device), validate=True)
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = 6: appending 3 token\(s\)"):
        append_kv(k, v, packed, packed, torch.tensor([6, 0], device=device),
                  cu_seqlens_new=torch.tensor([0, 3, 5], device=device), validate=True)
    # Shapes, dtypes and devices are checked always (no data read).
    with pytest.raises(ValueError, match="k_new must have shape"):
        append_kv(k, v, new[:, :, :, :2], new, torch.tensor([0, 0], device=device))
    with pytest.raises(TypeError, match="v_new has dtype torch.float16 but the cache has torch.float32"):
        append_kv(k, v, new, new.half(), torch.tensor([0, 0], device=device))
    with pytest.raises(ValueError, match=r"k_new must have shape \(total_new, 1, 4\) with cu_seqlens_new"):
        append_kv(k, v, new, new, torch.tensor([0, 0], device=device), cu_seqlens_new=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"cu_seqlens_new must have 3 offsets"):
        append_kv(k, v, packed, packed, torch.tensor([0, 0], device=device), cu_seqlens_new=torch.tensor([0, 5]))


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged-vllm-view"])
def test_append_kv_packed_writes_each_sequences_own_count(paged, device):
    """A chunked-prefill step: 3, 0 and 6 new tokens, packed back to back, land as the dense form would put them."""
    h_kv, d, counts, lengths = 2, 8, [3, 0, 6], [5, 9, 14]
    if paged:
        case = PagedCase(seqlens=(16, 16, 32), h_q=2, h_kv=h_kv, new=1, head_dim=d, causal=True, num_splits=1,
                         block_size=4, vllm_pool=True)
        inputs = case.make_inputs(torch.float32, device)
        k, v, table = inputs["k_cache"], inputs["v_cache"], inputs["block_table"]
    else:
        k, v, table = torch.randn(3, h_kv, 24, d, device=device), torch.randn(3, h_kv, 24, d, device=device), None
    k_before = k.clone()
    cu = torch.tensor([0, 3, 3, 9], dtype=torch.int32, device=device)
    k_new, v_new = torch.randn(2, sum(counts), h_kv, d, device=device)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    new = append_kv(k, v, k_new, v_new, seqlens, table, cu_seqlens_new=cu)
    assert new.tolist() == [n + c for n, c in zip(lengths, counts)] and new.dtype == torch.int32
    for b, (n, c) in enumerate(zip(lengths, counts)):
        rows = slice(cu[b].item(), cu[b + 1].item())
        got_k = ref_decode.gather_cache(k, b, n + c, table)
        got_v = ref_decode.gather_cache(v, b, n + c, table)
        # (c, Hkv, D) -> (Hkv, c, D)
        assert torch.equal(got_k[:, n:], k_new[rows].transpose(0, 1))
        assert torch.equal(got_v[:, n:], v_new[rows].transpose(0, 1))
        assert torch.equal(got_k[:, :n], ref_decode.gather_cache(k_before, b, n, table)), "earlier rows must be kept"


def test_append_kv_without_validate_drops_what_does_not_fit(device):
    """No host check: a row past the capacity, or in a block outside the pool, is not written, and nothing else is.

    Sequence 1 of the contiguous cache has room for 1 of its 3 new rows; sequence 0 of the paged one
    reaches a block-table entry of -1 (unallocated) and one of 9 (no such block); a negative length
    writes only the rows that land at positions >= 0.
    """
    k, v = torch.randn(2, 2, 1, 8, 4, device=device)
    expected_k, expected_v = k.clone(), v.clone()
    k_new, v_new = torch.randn(2, 2, 1, 3, 4, device=device)
    new = append_kv(k, v, k_new, v_new, torch.tensor([2, 7], dtype=torch.int32, device=device))
    expected_k[0, :, 2:5], expected_v[0, :, 2:5] = k_new[0], v_new[0]
    expected_k[1, :, 7:8], expected_v[1, :, 7:8] = k_new[1, :, :1], v_new[1, :, :1]
    assert torch.equal(k, expected_k) and torch.equal(v, expected_v)
    assert new.tolist() == [5, 10], "the lengths still count every new row: attention then flags sequence 1"

    k, v = torch.randn(2, 2, 1, 8, 4, device=device)
    expected_k, expected_v = k.clone(), v.clone()
    append_kv(k, v, k_new, v_new, torch.tensor([-2, 8], dtype=torch.int32, device=device))
    expected_k[0, :, 0:1], expected_v[0, :, 0:1] = k_new[0, :, 2:], v_new[0, :, 2:]
    assert torch.equal(k, expected_k) and torch.equal(v, expected_v)

    pool_k, pool_v = torch.randn(2, 4, 1, 2, 4, device=device)  # 4 blocks of 2 rows
    expected_k, expected_v = pool_k.clone(), pool_v.clone()
    table = torch.tensor([[3, -1, 9], [0, 1, 2]], dtype=torch.int32, device=device)
    new_k, new_v = torch.randn(2, 2, 1, 3, 4, device=device)
    append_kv(pool_k, pool_v, new_k, new_v, torch.tensor([1, 2], dtype=torch.int32, device=device), table)
    expected_k[3, :, 1], expected_v[3, :, 1] = new_k[0, :, 0], new_v[0, :, 0]  # position 1: block 3, row 1
    expected_k[1, :, 0:2], expected_v[1, :, 0:2] = new_k[1, :, :2], new_v[1, :, :2]  # positions 2, 3: block 1
    expected_k[2, :, 0], expected_v[2, :, 0] = new_k[1, :, 2], new_v[1, :, 2]  # position 4: block 2
    assert torch.equal(pool_k, expected_k) and torch.equal(pool_v, expected_v)

    k, v = torch.randn(2, 2, 1, 8, 4, device=device)
    before = k.clone(), v.clone()
    append_kv(k, v, k_new, v_new, torch.tensor([8, 100], dtype=torch.int32, device=device))  # nothing fits
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])

# ----------------------------------------------------------------------------
# fp8 caches: quantized on write by append_kv, dequantized by the kernel
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("fp8, per_row", [(torch.float8_e4m3fn, False), (torch.float8_e4m3fn, True),
                                          (torch.float8_e5m2, True)],
                         ids=["e4m3-per-tensor", "e4m3-per-row", "e5m2-per-row"])
def test_fp8_cache_written_by_append_kv_and_read_by_paged_attention(fp8, per_row, device):
    """vLLM's two schemes over a shuffled vLLM pool: append_kv quantizes packed prompts on write (the
    stored bits and per-row scales are exactly reference/fp8.py's), then one packed step (a decode token,
    a 3-token verification, a 20-token chunk) obeys the tolerance rule against float64 on the same cache."""
    from reference.fp8 import quantize_rows

    torch.manual_seed(5)
    h_q, h_kv, d, page = 4, 2, 48, 16
    lengths, new = (21, 5, 40), (1, 3, 20)
    pages = [-(-n // page) for n in lengths]
    pool_k = torch.full((sum(pages) + 1, page, h_kv, d), float("nan"), device=device).to(fp8)
    pool_v = pool_k.clone()
    k_cache, v_cache = pool_k.permute(0, 2, 1, 3), pool_v.permute(0, 2, 1, 3)  # (pages, Hkv, page, D) views
    order = torch.randperm(sum(pages) + 1)[:sum(pages)].tolist()
    table = torch.zeros(3, max(pages), dtype=torch.int32)
    for b, n in enumerate(pages):
        table[b, :n] = torch.tensor(order[sum(pages[:b]):sum(pages[:b + 1])])
    table = table.to(device)
    if per_row:
        k_scale, v_scale = (torch.full(k_cache.shape[:3], float("nan"), device=device) for _ in range(2))
    else:
        k_scale, v_scale = torch.tensor([0.02], device=device), torch.tensor([0.015], device=device)
    k_new, v_new = (torch.randn(sum(lengths), h_kv, d, device=device, dtype=torch.bfloat16) * 3 for _ in range(2))
    cu_new = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    seqlens = append_kv(k_cache, v_cache, k_new, v_new, torch.zeros(3, dtype=torch.int32, device=device), table,
                        cu_seqlens_new=cu_new, k_scale=k_scale, v_scale=v_scale)
    assert seqlens.tolist() == list(lengths)
    for name, cache, rows, scale in (("k", k_cache, k_new, k_scale), ("v", v_cache, v_new, v_scale)):
        stored, row_scale = quantize_rows(rows, scale, fp8)
        for b, n in enumerate(lengths):
            mine = slice(int(cu_new[b]), int(cu_new[b + 1]))
            got = ref_decode.gather_cache(cache, b, n, table).transpose(0, 1)  # (n, Hkv, D)
            assert torch.equal(got.view(torch.uint8), stored[mine].view(torch.uint8)), f"{name} bits, seq {b}"
            if per_row:
                got_scale = ref_decode.gather_cache(scale[..., None], b, n, table)[..., 0].transpose(0, 1)
                assert torch.equal(got_scale, row_scale[mine]), f"{name} scales, seq {b}"
    if per_row:  # each row's largest |value| lands on the format's largest value
        assert ref_decode.gather_cache(k_cache, 2, 40, table).float().abs().amax(-1).eq(torch.finfo(fp8).max).all()

    cu_q = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(sum(new), h_q, d, device=device, dtype=torch.bfloat16)
    args = (q, k_cache, v_cache, seqlens, table)
    options = dict(cu_seqlens_q=cu_q, causal=True, k_scale=k_scale, v_scale=v_scale)
    with torch.no_grad():
        out = paged_attention(*args, max_seqlen_q=max(new), **options)
    expected = ref.paged_attention(*args, **options, dtype=torch.float64)
    assert_close_to_reference(out, expected, ref.paged_attention(*args, **options), name="fp8 cache")


def test_fp8_cache_inputs_are_checked(device):
    k = torch.zeros(2, 2, 8, 4, dtype=torch.float8_e4m3fn, device=device)
    lengths = torch.tensor([1, 2], dtype=torch.int32, device=device)
    rows = torch.randn(2, 2, 1, 4, device=device)
    with pytest.raises(ValueError, match=r"an fp8 cache \(torch.float8_e4m3fn\) needs k_scale and v_scale"):
        append_kv(k, k.clone(), rows, rows, lengths)
    with pytest.raises(ValueError, match=r"k_scale must have shape \(1,\) \(per tensor\) or \(2, 2, 8\)"):
        append_kv(k, k.clone(), rows, rows, lengths, k_scale=torch.ones(2, device=device),
                  v_scale=torch.ones(1, device=device))
    with pytest.raises(TypeError, match="k_new has dtype torch.float8_e4m3fn; an fp8 cache"):
        append_kv(k, k.clone(), rows.to(torch.float8_e4m3fn), rows, lengths, k_scale=torch.ones(1, device=device),
                  v_scale=torch.ones(1, device=device))
    with pytest.raises(ValueError, match="k_scale and v_scale dequantize an fp8 cache; this one is torch.float32"):
        append_kv(k.float(), k.float(), rows, rows, lengths, k_scale=torch.ones(1, device=device),
                  v_scale=torch.ones(1, device=device))
    q = torch.randn(2, 2, 1, 4, device=device)
    with pytest.raises(TypeError, match="k_scale must be a float32 tensor"):
        decode_attention(q, k, k.clone(), lengths, k_scale=torch.ones(1, dtype=torch.float64, device=device),
                         v_scale=torch.ones(1, device=device))


@triton.jit
def _decode_kernel(X, Y, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, _e4m3_to_float(tl.load(X + offs)))


def test_e4m3_bytes_decode_exactly(device):
    """Every one of the 256 e4m3fn bytes, decoded in software as a GPU before sm_89 reads an e4m3 cache."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(device)
    decoded = torch.empty(256, dtype=torch.float32, device=device)
    _decode_kernel[(1,)](codes, decoded, BLOCK=256)
    expected = codes.view(torch.float8_e4m3fn).float()
    assert torch.equal(decoded.isnan(), expected.isnan())
    assert torch.equal(decoded.nan_to_num(0.0).view(torch.int32), expected.nan_to_num(0.0).view(torch.int32))


def test_an_e4m3_cache_is_read_as_bytes_before_sm89(monkeypatch, device):
    """An A100 or RTX 3090 has no e4m3 type in Triton: the launcher hands the kernel the cache's bytes and the
    kernel decodes them; the result obeys the tolerance rule as on sm_89 and later. On the CPU an sm_86 is
    emulated (ATTN_CHIP); on a GPU the test runs on the GPU's own chip, which reads bytes only before sm_89."""
    from kernels import configs
    from kernels import paged as paged_launcher

    reads_bytes = device != "cuda" or torch.cuda.get_device_capability() < (8, 9)

    torch.manual_seed(6)
    lengths = torch.tensor([40, 7], dtype=torch.int32, device=device)
    latent = torch.randn(2, 2, 48, 32, device=device) * 2
    scale = latent.abs().amax(-1) / 448  # one per row and kv head
    cache = (latent / scale[..., None]).to(torch.float8_e4m3fn)
    q = torch.randn(2, 4, 1, 32, device=device, dtype=torch.bfloat16)
    args, options = (q, cache, cache.clone(), lengths), dict(k_scale=scale, v_scale=scale.clone())
    monkeypatch.setenv(configs.CHIP_ENV, "sm_86")
    configs.reset()
    try:
        with torch.no_grad():
            out = decode_attention(*args, **options)
        plans = [plan for _, plan in paged_launcher._PLANS.values()]
        assert plans and all(plan.e4m3_bytes == reads_bytes for plan in plans), (
            f"the cache was {'not ' if reads_bytes else ''}read as bytes")
    finally:
        monkeypatch.delenv(configs.CHIP_ENV)
        configs.reset()
    expected = ref.paged_attention(*args, **options, dtype=torch.float64)
    assert_close_to_reference(out, expected, ref.paged_attention(*args, **options), name="e4m3 bytes on sm_86")


def test_only_config_reaches_a_call_whose_plan_is_cached(device):
    """A launch plan holds its config: only_config drops the plans on entry and exit, so a decode loop's cached
    plan cannot outlive the forced config or hide it."""
    from kernels import configs
    from kernels import paged as paged_launcher

    q = torch.randn(2, 4, 1, 32, device=device)
    k = torch.randn(2, 2, 40, 32, device=device)
    lengths = torch.tensor([40, 7], dtype=torch.int32, device=device)
    with torch.no_grad():
        decode_attention(q, k, k, lengths)  # the plan of this call signature, with the usual config
        usual = [plan.config for _, plan in paged_launcher._PLANS.values()]
        forced = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
        assert forced not in usual
        with configs.only_config("paged", forced):
            out = decode_attention(q, k, k, lengths)
            assert [plan.config for _, plan in paged_launcher._PLANS.values()] == [forced]
        decode_attention(q, k, k, lengths)
        assert [plan.config for _, plan in paged_launcher._PLANS.values()] == usual
    expected = ref.paged_attention(q, k, k, lengths, dtype=torch.float64)
    assert_close_to_reference(out, expected, ref.paged_attention(q, k, k, lengths), name="forced config")
