"""Flash-decoding (kernels/decode.py) against float64, its plain twin (reference/decode.py), and bad input."""
import math

import pytest
import torch

import kernels.runtime
import reference.decode as ref
from conftest import DEVICE
from kernels import append_kv, decode_attention
from kernels.decode import _decode_fwd, check_decode_kernel_inputs, choose_num_splits
from tests.cases import DECODE_CASES, DecodeCase, dtype_params
from tests.helpers import assert_close, assert_close_to_reference, poisoned_like


def run_poisoned(q, k, v, seqlens, table, causal, num_splits):
    """The launcher, writing into NaN-filled outputs and partials: an unwritten element fails the test."""
    check_decode_kernel_inputs(q, k, v, seqlens, table)
    batch, h_q, n_q, head_dim = q.shape
    o = poisoned_like(q, shape=q.shape)
    lse = poisoned_like(q, shape=q.shape[:3], dtype=torch.float32)
    o_part = poisoned_like(q, shape=(num_splits, batch, h_q, n_q, head_dim), dtype=torch.float32)
    lse_part = poisoned_like(q, shape=(num_splits, batch, h_q, n_q), dtype=torch.float32)
    return _decode_fwd(q, k, v, seqlens, table, causal, 1.0 / math.sqrt(head_dim), num_splits,
                       o=o, lse=lse, o_part=o_part, lse_part=lse_part)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in DECODE_CASES])
def test_decode_matches_float64(case, dtype, device):
    q, k, v, seqlens, table = case.make_inputs(dtype, device)
    with torch.no_grad():
        if case.num_splits is None:  # the public function's own choice
            o, lse = decode_attention(q, k, v, seqlens, table, causal=case.causal, return_lse=True)
        else:
            o, lse = run_poisoned(q, k, v, seqlens, table, case.causal, case.num_splits)
    o64, lse64 = ref.decode_attention(q, k, v, seqlens, table, case.causal, return_lse=True, dtype=torch.float64)
    o_torch = ref.decode_attention(q, k, v, seqlens, table, case.causal)  # PyTorch's own, in `dtype`
    assert_close_to_reference(o, o64, o_torch, name=f"o ({dtype})")
    lse32 = ref.decode_attention(q, k, v, seqlens, table, case.causal, return_lse=True, dtype=torch.float32)[1]
    assert_close_to_reference(lse, lse64, lse32, name=f"lse ({dtype})")
    assert o.dtype == dtype and lse.dtype == torch.float32


def test_reference_split_merge_equals_one_pass(device):
    """The plain blueprint: splitting the keys and merging by lse changes nothing but rounding."""
    for case in DECODE_CASES[:3]:
        q, k, v, seqlens, table = case.make_inputs(torch.float64, device)
        whole = ref.decode_attention(q, k, v, seqlens, table, case.causal, return_lse=True)
        for splits in (2, 5, 40):
            split = ref.decode_attention(q, k, v, seqlens, table, case.causal, return_lse=True, num_splits=splits)
            assert_close(split[0], whole[0], f"o, {splits} splits, {case.id}")
            assert_close(split[1], whole[1], f"lse, {splits} splits, {case.id}")


def test_public_api_int64_indices_and_custom_scale(device):
    case = DECODE_CASES[3]
    q, k, v, seqlens, table = case.make_inputs(torch.float32, device)
    with torch.no_grad():
        o, lse = decode_attention(q, k, v, seqlens, table, causal=case.causal, return_lse=True, num_splits=2)
        assert torch.equal(decode_attention(q, k, v, seqlens, table, causal=case.causal, num_splits=2), o)
        o64 = decode_attention(q, k, v, seqlens.long(), table.long(), causal=case.causal, num_splits=2)
        assert torch.equal(o64, o), "int64 cache_seqlens and block_table must give the same result"
        scaled = decode_attention(q, k, v, seqlens, table, causal=case.causal, sm_scale=0.3)
    expected = ref.decode_attention(q, k, v, seqlens, table, case.causal, sm_scale=0.3, dtype=torch.float64)
    assert_close_to_reference(scaled, expected, ref.decode_attention(q, k, v, seqlens, table, case.causal,
                                                                     sm_scale=0.3))


@pytest.mark.parametrize("num_splits", [1, 3], ids=["written-by-the-split-kernel", "written-by-the-merge"])
def test_bf16_output_is_rounded_to_nearest(num_splits, device):
    """The fp32 result is far more exact than bf16, so rounding it to nearest gives the float64 result
    rounded to bf16 almost everywhere; truncation (the interpreter's own cast) would match half the time."""
    q, k, v, seqlens, _ = DECODE_CASES[0].make_inputs(torch.bfloat16, device)
    with torch.no_grad():
        o = decode_attention(q, k, v, seqlens, num_splits=num_splits)
    rounded = ref.decode_attention(q, k, v, seqlens, dtype=torch.float64).to(torch.bfloat16)
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


# ----------------------------------------------------------------------------
# append_kv
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged-vllm-view"])
def test_append_kv_writes_each_sequence_at_its_length(paged, device):
    h_kv, d, n_new = 2, 8, 3
    lengths = [5, 0, 14]  # the third sequence crosses a block edge
    if paged:
        case = DecodeCase(seqlens=(16, 16, 32), h_q=2, h_kv=h_kv, n_q=1, head_dim=d, causal=True, num_splits=1,
                          block_size=16, vllm_pool=True)
        _, k, v, _, table = case.make_inputs(torch.float32, device)
    else:
        k, v, table = torch.zeros(3, h_kv, 20, d, device=device), torch.zeros(3, h_kv, 20, d, device=device), None
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    k_new, v_new = torch.randn(2, 3, h_kv, n_new, d, device=device)
    k_before = k.clone()
    new = append_kv(k, v, k_new, v_new, seqlens, table)
    assert new.tolist() == [n + n_new for n in lengths] and new.dtype == torch.int32
    for b, n in enumerate(lengths):
        got_k = ref.gather_cache(k, b, n + n_new, table)
        got_v = ref.gather_cache(v, b, n + n_new, table)
        assert torch.equal(got_k[:, n:], k_new[b]) and torch.equal(got_v[:, n:], v_new[b])
        assert torch.equal(got_k[:, :n], ref.gather_cache(k_before, b, n, table)), "earlier rows must be kept"


def test_append_kv_checks_capacity_and_blocks(device):
    k = v = torch.zeros(2, 1, 8, 4, device=device)
    new = torch.zeros(2, 1, 3, 4, device=device)
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 7: appending 3 token\(s\) passes .* capacity of 8"):
        append_kv(k, v, new, new, torch.tensor([0, 7], device=device))
    pool = torch.zeros(4, 1, 16, 4, device=device)
    table = torch.tensor([[0, 1], [2, 9]], dtype=torch.int32, device=device)  # 9 is not a block of 4
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 9 is not a block of the pool"):
        append_kv(pool, pool, new, new, torch.tensor([0, 15], device=device), table)
    with pytest.raises(ValueError, match="k_new must have shape"):
        append_kv(k, v, new[:, :, :, :2], new, torch.tensor([0, 0], device=device))
    with pytest.raises(TypeError, match="v_new has dtype torch.float16 but the cache has torch.float32"):
        append_kv(k, v, new, new.half(), torch.tensor([0, 0], device=device))


# ----------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any kernel runs
# ----------------------------------------------------------------------------
def _inputs(n_q=1, dtype=torch.float32, paged=False):
    case = DecodeCase(seqlens=(20, 40), h_q=4, h_kv=2, n_q=n_q, head_dim=16, causal=True, num_splits=1,
                      block_size=16 if paged else None)
    return case.make_inputs(dtype, DEVICE)


def _expect(error, match, *args, **kwargs):
    with torch.no_grad(), pytest.raises(error, match=match):
        decode_attention(*args, **kwargs)


def test_lengths_outside_the_cache_are_refused():
    q, k, v, seqlens, _ = _inputs(n_q=3)
    def lengths(*n):
        return torch.tensor(n, device=DEVICE)

    _expect(ValueError, r"cache_seqlens\[1\] = 46 is outside \[3, 45\]", q, k, v, lengths(20, 46))
    _expect(ValueError, r"cache_seqlens\[0\] = 2 is outside \[3, 45\]", q, k, v, lengths(2, 40))
    q, k, v, seqlens, table = _inputs(paged=True)
    _expect(ValueError, r"cache_seqlens\[0\] = 65 is outside \[1, 64\]", q, k, v, lengths(65, 40), table)


def test_block_index_out_of_the_pool_is_refused():
    q, k, v, seqlens, table = _inputs(paged=True)
    for bad in (k.shape[0], -1):
        broken = table.clone()
        broken[1, 2] = bad  # sequence 1 (40 keys) uses blocks 0..2
        _expect(ValueError, rf"block_table\[1, 2\] = {bad} is not a block of the pool", q, k, v, seqlens, broken)
    broken = table.clone()
    broken[0, 3] = 10_000  # past sequence 0's 20 keys: never read, so allowed
    with torch.no_grad():
        decode_attention(q, k, v, seqlens, broken)


def test_dtypes_devices_and_index_types_must_match():
    q, k, v, seqlens, table = _inputs(paged=True)
    _expect(TypeError, "k_cache has dtype torch.float16 but q has torch.float32", q, k.half(), v.half(), seqlens, table)
    _expect(TypeError, "v_cache has dtype torch.float16 but k_cache has torch.float32", q, k, v.half(), seqlens, table)
    _expect(ValueError, f"k_cache is on meta but q is on {DEVICE}", q, k.to("meta"), v.to("meta"),
            seqlens.to("meta"), table.to("meta"))
    _expect(ValueError, "block_table is on meta", q, k, v, seqlens, table.to("meta"))
    _expect(TypeError, "cache_seqlens must have dtype torch.int32 or torch.int64", q, k, v, seqlens.float(), table)
    _expect(TypeError, "block_table must have dtype torch.int32 or torch.int64", q, k, v, seqlens, table.float())
    _expect(TypeError, "q has dtype torch.float64; decode_attention supports", q.double(), k.double(), v.double(),
            seqlens, table)


def test_shapes_and_limits_are_checked():
    q, k, v, seqlens, _ = _inputs()
    _expect(ValueError, "q has 17 query tokens", q.expand(-1, -1, 17, -1), k, v, seqlens)
    _expect(ValueError, "q must have rank 4", q[0], k, v, seqlens)
    _expect(ValueError, "k_cache and v_cache must have the same shape", q, k, v[:, :, :10], seqlens)
    _expect(ValueError, "q has batch 1 but cache_seqlens has 2", q[:1], k, v, seqlens)
    _expect(ValueError, "k_cache holds 2 sequences but cache_seqlens has 3", q, k, v,
            torch.tensor([20, 40, 1], device=DEVICE))
    _expect(ValueError, "q has head_dim 16 but k_cache has 8", q, k[..., :8], v[..., :8], seqlens)
    _expect(ValueError, r"multiple of the number of kv heads", q[:, :3], k, v, seqlens)
    _expect(ValueError, "cache_seqlens must have rank 1", q, k, v, seqlens[:, None])
    _expect(ValueError, "num_splits must be None or an int >= 1", q, k, v, seqlens, num_splits=0)
    _expect(TypeError, "sm_scale must be a finite float", q, k, v, seqlens, sm_scale=float("nan"))
    pool = torch.zeros(8, 2, 24, 16, device=DEVICE)  # block size 24: not a power of two
    _expect(ValueError, "block_size .* must be a power of two >= 16", q, pool, pool, seqlens,
            torch.zeros(2, 3, dtype=torch.int32, device=DEVICE))
    _expect(ValueError, "block_table has 1 rows but cache_seqlens has 2", q, pool[:, :, :16], pool[:, :, :16],
            seqlens, torch.zeros(1, 3, dtype=torch.int32, device=DEVICE))


def test_gradients_are_refused_and_cpu_needs_the_interpreter(monkeypatch):
    q, k, v, seqlens, _ = _inputs()
    with pytest.raises(ValueError, match="no backward pass"):
        decode_attention(q.requires_grad_(), k, v, seqlens)
    monkeypatch.setattr(kernels.runtime, "INTERPRET", False)
    q, k, v, seqlens = (t.cpu() for t in _inputs()[:4])
    with torch.no_grad(), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        decode_attention(q, k, v, seqlens)
