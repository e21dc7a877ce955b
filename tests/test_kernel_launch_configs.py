"""The GPU launch configurations and the autotuner, checked on the CPU from the arguments the launchers pass.

Under the interpreter each tuned kernel has a single config and never prunes
or times anything, so a bug there would only show on a GPU, at the first
launch. Here the launchers run with each tuned kernel replaced by a GPU-style
stand-in: the real autotuner class over the real GPU config lists, whose
benchmarking is stubbed (each config gets a fixed fake time, and calls are
counted) and whose kernel only records the config it was launched with.
"""
import contextvars
import importlib
import inspect
import math

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from reference import naive_attention
from tests.cases import AttentionCase
from tests.helpers import GRADIENT_FACTOR, assert_close_to_reference

fa = importlib.import_module("kernels.flash_attention")
tune = importlib.import_module("kernels.autotune")
LAUNCHER_NAMES = {"fwd": "_attn_fwd_tuned", "bwd_dkdv": "_attn_bwd_dkdv_tuned", "bwd_dq": "_attn_bwd_dq_tuned"}
KERNELS = {"fwd": tune._attn_fwd, "bwd_dkdv": tune._attn_bwd_dkdv, "bwd_dq": tune._attn_bwd_dq}
TABLES = {"fwd": tune._FWD_CONFIGS, "bwd_dkdv": tune._DKDV_CONFIGS, "bwd_dq": tune._DQ_CONFIGS}


class RecordingKernel:
    """Stands in for the JIT kernel under an autotuner: records the config of every launch."""

    def __init__(self):
        self.launches = []

    def run(self, *args, grid, warmup, **kwargs):
        self.launches.append({"grid": grid, "args": args, "kwargs": kwargs})


def gpu_style_tuner(name):
    """The real autotuner over the real GPU lists, with its benchmark and its kernel stubbed."""
    tuner = tune._BucketedAutotuner(KERNELS[name], TABLES[name])
    tuner.fn = RecordingKernel()
    tuner.bench_calls = []

    def fake_bench(*args, config, **kwargs):
        tuner.bench_calls.append(config)
        return [float(config.num_stages), 0.0, 0.0]  # a fixed, config-dependent time: the fewest stages wins

    tuner._bench = fake_bench
    return tuner


class Skipped:
    """Stands in for an untuned kernel (the backward's preprocess): `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.fixture
def tuners(monkeypatch):
    """GPU-style tuners installed where the launchers (and only_config) look them up."""
    monkeypatch.setattr(fa, "_attn_bwd_preprocess", Skipped(), raising=False)
    tuners = {name: gpu_style_tuner(name) for name in LAUNCHER_NAMES}
    for name, tuner in tuners.items():
        monkeypatch.setattr(fa, LAUNCHER_NAMES[name], tuner)
        monkeypatch.setitem(tune.TUNED_KERNELS, name, tuner)
    return tuners


def launch(case, dtype, backward=True):
    """Run the forward (and backward) launchers on `case`; the stand-ins record instead of computing."""
    q, k, v = case.make_inputs(dtype, "cpu")
    o, lse = torch.zeros_like(q), torch.zeros(q.shape[:3])
    fa._flash_fwd(q, k, v, case.causal, 0.125)
    if backward:
        fa._flash_bwd(torch.randn_like(q), q, k, v, o, lse, case.causal, 0.125)


def launched_config(tuner):
    kwargs = tuner.fn.launches[-1]["kwargs"]
    return (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["num_stages"])


def shape(config):
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def pruned(tuner, launch_record):
    """What the tuner keeps for a recorded launch (as its run does: nargs, then prune_configs)."""
    tuner.nargs = dict(zip(tuner.arg_names, launch_record["args"]))
    try:
        return tuner.prune_configs(launch_record["kwargs"])
    finally:
        tuner.nargs = None


@pytest.mark.parametrize("case", [
    AttentionCase(batch=1, h_q=4, h_kv=2, n_q=4096, n_k=4096, head_dim=128, causal=True),
    AttentionCase(batch=1, h_q=4, h_kv=1, n_q=2000, n_k=3000, head_dim=256, causal=False),
    AttentionCase(batch=2, h_q=2, h_kv=2, n_q=20, n_k=20, head_dim=40, causal=True),
    # decoding: one query row over a long cache, and a long prompt over a short cache (Nq > Nk)
    AttentionCase(batch=1, h_q=8, h_kv=2, n_q=1, n_k=1000, head_dim=128, causal=True),
    AttentionCase(batch=1, h_q=2, h_kv=2, n_q=3000, n_k=24, head_dim=64, causal=False),
], ids=lambda c: c.id)
def test_pruned_configs_fit_the_shape(tuners, case):
    launch(case, torch.bfloat16)
    for name, tuner in tuners.items():
        record = tuner.fn.launches[0]
        kept = pruned(tuner, record)
        shortlist = TABLES[name][("16-bit", 128 if case.head_dim <= 128 else 256)]
        assert kept and all(config in shortlist for config in kept), f"{name}: {kept} not from {shortlist}"
        shortest_m = min(c.kwargs["BLOCK_M"] for c in shortlist)
        shortest_n = min(c.kwargs["BLOCK_N"] for c in shortlist)
        for config in kept:
            block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
            assert min(block_m, block_n) >= 16, f"{name}: tl.dot needs tiles of at least 16, got {config}"
            # Query tiles are pruned against N_Q, key tiles against N_K, each at its power-of-two bucket.
            assert block_m <= max(triton.next_power_of_2(case.n_q), shortest_m), f"{name}: {config} for {case.id}"
            assert block_n <= max(triton.next_power_of_2(case.n_k), shortest_n), f"{name}: {config} for {case.id}"
        assert len(kept) > 1 or min(case.n_q, case.n_k) < 64, f"{name}: nothing to tune for {case.id}"
        # The grid covers every tile of every head (a 1-D or 2-D grid; dK/dV may split a GQA group further).
        grid = record["grid"](kept[0].kwargs)
        if name == "bwd_dkdv":
            tiles = triton.cdiv(case.n_k, kept[0].kwargs["BLOCK_N"]) * case.batch * case.h_kv
        else:
            tiles = triton.cdiv(case.n_q, kept[0].kwargs["BLOCK_M"]) * case.batch * case.h_q
        assert min(grid) >= 1 and math.prod(grid) >= tiles, f"{name}: grid {grid} for {tiles} tiles"


def test_a_single_query_row_keeps_the_shortest_query_tiles(tuners):
    launch(AttentionCase(batch=1, h_q=4, h_kv=4, n_q=1, n_k=4096, head_dim=128, causal=False), torch.float16)
    for name in ("fwd", "bwd_dq"):
        kept = pruned(tuners[name], tuners[name].fn.launches[0])
        shortest_m = min(c.kwargs["BLOCK_M"] for c in TABLES[name][("16-bit", 128)])
        assert {c.kwargs["BLOCK_M"] for c in kept} == {shortest_m}, f"{name}: {kept}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("head_dim", [128, 256])
def test_fp32_and_fp64_get_their_one_config_untimed(tuners, dtype, head_dim):
    launch(AttentionCase(batch=1, h_q=2, h_kv=2, n_q=1024, n_k=1024, head_dim=head_dim, causal=True), dtype)
    precision = "fp32" if dtype == torch.float32 else "fp64"
    for name, tuner in tuners.items():
        (expected,) = TABLES[name][(precision, head_dim)]
        assert launched_config(tuner) == shape(expected), name
        assert tuner.bench_calls == [], f"{name}: a single config was timed"


def test_a_growing_kv_cache_tunes_once_per_length_bucket(tuners):
    """A decode loop over N_K = 1000..1100 times the configs per bucket (1024 and 2048), not per token."""
    for n_k in range(1000, 1101):
        launch(AttentionCase(batch=1, h_q=4, h_kv=2, n_q=1, n_k=n_k, head_dim=64, causal=True), torch.bfloat16)
    for name, tuner in tuners.items():
        assert len(tuner.fn.launches) == 101, name
        assert len(tuner.cache) == 2, f"{name}: tuned for {len(tuner.cache)} keys, want one per bucket"
        first, last = tuner.fn.launches[0], tuner.fn.launches[-1]
        per_bucket = len(pruned(tuner, first)) + len(pruned(tuner, last))
        assert len(tuner.bench_calls) == per_bucket, f"{name}: {len(tuner.bench_calls)} configs timed"
        # Every launch uses its bucket's winner: the fake times make the fewest stages win.
        fewest_stages = min(c.num_stages for c in pruned(tuner, last))
        assert launched_config(tuner)[3] == fewest_stages, name


def test_the_tuning_key_holds_buckets_and_every_constexpr(tuners):
    tuner = tuners["fwd"]
    base = AttentionCase(batch=1, h_q=4, h_kv=4, n_q=512, n_k=1000, head_dim=64, causal=True)
    variants = {
        "same bucket": (AttentionCase(1, 4, 4, 500, 1024, 64, True), torch.bfloat16, False),
        "next bucket": (AttentionCase(1, 4, 4, 512, 1025, 64, True), torch.bfloat16, True),
        "causal off": (AttentionCase(1, 4, 4, 512, 1000, 64, False), torch.bfloat16, True),
        "gqa": (AttentionCase(1, 4, 2, 512, 1000, 64, True), torch.bfloat16, True),
        "fp16": (base, torch.float16, True),
        "head dim": (AttentionCase(1, 4, 4, 512, 1000, 128, True), torch.bfloat16, True),
        "batch, heads": (AttentionCase(3, 8, 8, 512, 1000, 64, True), torch.bfloat16, False),
    }
    launch(base, torch.bfloat16, backward=False)
    for what, (case, dtype, new_key) in variants.items():
        before = len(tuner.cache)
        launch(case, dtype, backward=False)
        assert (len(tuner.cache) > before) == new_key, f"{what}: {'no new' if new_key else 'a new'} tuning key"
    # Every constexpr but those the configs choose (BLOCK_M/BLOCK_N, and the forward's Hopper options) is in
    # the key, so new kernel switches need no change here.
    chosen = {"BLOCK_M", "BLOCK_N", "USE_TMA", "WARP_SPECIALIZE"}
    for name, tuner in tuners.items():
        constexprs = {n for n, p in inspect.signature(tuner.base_fn).parameters.items() if p.annotation is tl.constexpr}
        assert set(tuner.key_constexprs) == constexprs - chosen, name


def test_pinned_configs_take_the_first_pruned_config_untimed(tuners, monkeypatch):
    monkeypatch.setenv(tune.PIN_CONFIGS_ENV, "1")
    for case in (AttentionCase(1, 2, 2, 256, 256, 128, True), AttentionCase(1, 2, 2, 1, 256, 128, True)):
        launch(case, torch.bfloat16)
        for name, tuner in tuners.items():
            first = tune._prune_configs(TABLES[name], torch.bfloat16, case.head_dim, case.n_q, case.n_k)[0]
            assert launched_config(tuner) == shape(first), f"{name} on {case.id}"
            assert tuner.bench_calls == [], f"{name}: timed configs although pinned"


def test_only_config_forces_one_config_and_restores_the_tuner(tuners):
    case = AttentionCase(1, 2, 2, 256, 256, 128, True)
    forced = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=2, num_stages=5)
    for name, tuner in tuners.items():
        configs = list(tuner.configs)
        tuner.bench_calls.clear()
        with tune.only_config(name, forced):
            launch(case, torch.bfloat16)
            assert launched_config(tuner) == shape(forced), name
            assert tuner.bench_calls == [], name
        assert tuner.configs == configs and not tuner.cache, f"{name}: not restored"
        launch(case, torch.bfloat16)
        assert launched_config(tuner) != shape(forced) and tuner.bench_calls, f"{name}: still forced"


def test_only_config_rejects_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        with tune.only_config("forward", triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})):
            pass
    with pytest.raises(TypeError, match="config"):
        with tune.only_config("fwd", {"BLOCK_M": 16, "BLOCK_N": 16}):
            pass


@pytest.mark.parametrize("name", list(LAUNCHER_NAMES))
def test_only_config_runs_the_real_kernel_with_that_config(name):
    """The tuning bench's path: the public function, one kernel forced to a non-default tile, right results."""
    case = AttentionCase(batch=1, h_q=2, h_kv=1, n_q=37, n_k=45, head_dim=24, causal=True)
    q, k, v = case.make_inputs(torch.float32, "cpu", requires_grad=True)
    do = torch.randn_like(q)
    forced = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
    with tune.only_config(name, forced) as tuner:
        o = fa.flash_attention(q, k, v, causal=True)
        grads = torch.autograd.grad(o, (q, k, v), do)
        assert tuner.best_config is forced
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64 = naive_attention(q64, k64, v64, True)
    grads64 = torch.autograd.grad(o64, (q64, k64, v64), do.double())
    o32 = naive_attention(q, k, v, True)
    grads32 = torch.autograd.grad(o32, (q, k, v), do)
    assert_close_to_reference(o, o64, o32, name="o")
    for what, grad, grad64, grad32 in zip("qkv", grads, grads64, grads32):
        assert_close_to_reference(grad, grad64, grad32, factor=GRADIENT_FACTOR, name=f"d{what}")


# ----------------------------------------------------------------------------
# The forward's Hopper options (descriptor loads, warp specialization): offered only where they can run
# ----------------------------------------------------------------------------
def hopper_options(config):
    return config.kwargs.get("USE_TMA", False), config.kwargs.get("WARP_SPECIALIZE", False)


POINTERS_ONLY = {(False, False)}
WITH_TMA = {(False, False), (True, False)}
WITH_TMA_AND_WS = {(False, False), (True, False), (True, True)}


def timed_options(tuner, call):
    """The (USE_TMA, WARP_SPECIALIZE) pairs among the configs the forward's tuner timed for one fresh call."""
    tuner.cache.clear()
    tuner.bench_calls.clear()
    call()
    return {hopper_options(config) for config in tuner.bench_calls}


def test_hopper_options_are_offered_where_they_can_run(tuners, monkeypatch):
    tuner = tuners["fwd"]
    q, k, v = AttentionCase(1, 4, 2, 2048, 2048, 128, False).make_inputs(torch.bfloat16, "cpu")

    def forward(q=q, k=k, v=v, causal=False, **options):
        return lambda: fa._flash_fwd(q, k, v, causal, 0.125, **options)

    assert timed_options(tuner, forward()) == POINTERS_ONLY, "descriptor configs offered without TMA hardware"
    monkeypatch.setattr(tune, "has_tma", lambda device: True)  # from here on, an H100
    assert timed_options(tuner, forward()) == WITH_TMA_AND_WS
    # Warp specialization is for the plain non-causal loop only.
    assert timed_options(tuner, forward(causal=True)) == WITH_TMA
    assert timed_options(tuner, forward(window_size=(256, 256))) == WITH_TMA
    # Packed sequences: descriptors bounded per sequence, but warp specialization does not compile.
    cu = torch.tensor([0, 1000, 2048], dtype=torch.int32)
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]  # (1, H, N, D) -> (N, H, D), a view
    assert timed_options(tuner, forward(*packed, cu_seqlens=(cu, cu), max_seqlens=(1048, 1048))) == WITH_TMA
    # A layout TMA cannot read: rows 258 bytes apart.
    sliced = [t[..., :128] for t in AttentionCase(1, 4, 2, 2048, 2048, 129, False).make_inputs(torch.float16, "cpu")]
    assert timed_options(tuner, forward(*sliced)) == POINTERS_ONLY
    # Head dim 256 has a descriptor config, fp32 none (its one config runs untimed).
    q256, k256, v256 = AttentionCase(1, 4, 2, 2048, 2048, 256, False).make_inputs(torch.bfloat16, "cpu")
    assert timed_options(tuner, forward(q256, k256, v256)) == WITH_TMA
    assert timed_options(tuner, forward(*(t.float() for t in (q, k, v)))) == set()
    assert hopper_options(tuner.best_config) == (False, False)
    # A pinned run takes the first config, which is never a Hopper option.
    monkeypatch.setenv(tune.PIN_CONFIGS_ENV, "1")
    forward()()
    assert hopper_options(tuner.best_config) == (False, False)


def test_a_strided_view_never_reuses_a_descriptor_config(tuners, monkeypatch):
    """Whether the inputs allow descriptors joins the tuning key: same shape, other layout, another tuning."""
    tuner = tuners["fwd"]
    monkeypatch.setattr(tune, "has_tma", lambda device: True)
    tuner._bench = lambda *args, config, **kwargs: [0.0 if hopper_options(config)[0] else 1.0, 0.0, 0.0]
    q, k, v = AttentionCase(1, 4, 2, 1000, 1000, 120, True).make_inputs(torch.bfloat16, "cpu")
    fa._flash_fwd(q, k, v, True, 0.125)
    assert hopper_options(tuner.best_config) == (True, False), "a descriptor config won the fake timing"
    # The same shape with rows 242 bytes apart, then with a last stride of 1000.
    wide = AttentionCase(1, 4, 2, 1000, 1000, 121, True).make_inputs(torch.bfloat16, "cpu")
    fa._flash_fwd(*(t[..., :120] for t in wide), True, 0.125)
    fa._flash_fwd(*(t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v)), True, 0.125)
    assert len(tuner.cache) == 2, "an aligned and a misaligned layout must have their own tuning keys"
    assert not hopper_options(tuner.best_config)[0], "a strided view reused the descriptor config"


def test_the_launcher_sets_a_descriptor_allocator_only_where_one_can_run(tuners, monkeypatch):
    """Triton needs an allocator for on-device descriptors: set one on a TMA GPU, never replace the program's."""
    q, k, v = AttentionCase(1, 2, 2, 64, 64, 64, False).make_inputs(torch.float16, "cpu")

    def allocator_after(has_tma, inputs=(q, k, v), own=None):
        def call():
            if own is not None:
                triton.set_allocator(own)
            monkeypatch.setattr(fa, "has_tma", lambda device: has_tma)
            fa._flash_fwd(*inputs, False, 0.125)
            return _allocation._allocator.get()
        return contextvars.copy_context().run(call)  # the allocator is a context variable: keep it in there

    def own(size, alignment, stream):
        return None

    assert isinstance(allocator_after(False), _allocation.NullAllocator), "set without TMA hardware"
    assert allocator_after(True) is fa._descriptor_scratch
    misaligned = [t[..., :64] for t in AttentionCase(1, 2, 2, 64, 64, 65, False).make_inputs(torch.float16, "cpu")]
    assert isinstance(allocator_after(True, inputs=misaligned), _allocation.NullAllocator), \
        "set for inputs that cannot take descriptors"
    assert allocator_after(True, own=own) is own, "the program's own allocator was replaced"
