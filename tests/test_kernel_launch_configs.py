"""How launch configs are chosen (kernels/configs.py), checked on the CPU with the GPU's tables.

Under the interpreter the kernels run one fixed config, so a bug in the
choice would only show on a GPU. Here the launchers run with the chooser
told which chip it is on (a chip stand-in or ATTN_CHIP), and with each Triton
kernel replaced by a recorder that keeps the config of every launch and the
device that was current at the time: the real choice, without the kernels.
A few tests then run the real kernels under the interpreter with a GPU chip's
configs, where what matters is the arithmetic (timing runs, reproducibility).
"""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from reference import naive_attention
from tests.cases import AttentionCase
from tests.helpers import GRADIENT_FACTOR, assert_close_to_reference

configs = importlib.import_module("kernels.configs")
fa = importlib.import_module("kernels.flash_attention")
ops = importlib.import_module("kernels.ops")
paged = importlib.import_module("kernels.paged")
runtime = importlib.import_module("kernels.runtime")
ROOT = Path(__file__).resolve().parent.parent
LAUNCHED = {"fwd": "_attn_fwd", "bwd_dkdv": "_attn_bwd_dkdv", "bwd_dq": "_attn_bwd_dq"}


class Recorder:
    """Stands in for a Triton kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, log, name, guard):
        self.log, self.name, self.guard = log, name, guard

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append({"kernel": self.name, "grid": grid, "args": args, "kwargs": kwargs,
                             "device": self.guard.current})
        return launch


class DeviceGuard:
    """Stands in for runtime.on_device: remembers which device is current while a launcher runs."""

    current = None

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self.saved, DeviceGuard.current = DeviceGuard.current, self.device
        return self

    def __exit__(self, *exc):
        DeviceGuard.current = self.saved
        return False


@pytest.fixture
def on_chip(monkeypatch):
    """Make the chooser pick for a chip by name (ATTN_CHIP), with fresh memos; returns the setter."""
    def use(arch):
        monkeypatch.setenv(configs.CHIP_ENV, arch)
        configs.reset()
        return configs.CHIPS[arch]
    yield use
    monkeypatch.delenv(configs.CHIP_ENV, raising=False)
    configs.reset()


@pytest.fixture
def launches(monkeypatch):
    """Every Triton kernel the launchers call replaced by a Recorder; the list of launches they made."""
    log = []
    monkeypatch.setattr(runtime, "on_device", DeviceGuard)
    for module in (fa, paged, importlib.import_module("kernels.softmax")):
        for name, value in list(vars(module).items()):
            if isinstance(value, triton.runtime.jit.KernelInterface):
                monkeypatch.setattr(module, name, Recorder(log, name, DeviceGuard))
    return log


def run_flash(case, dtype, backward=True, **options):
    q, k, v = case.make_inputs(dtype, "cpu")
    o, lse = fa._flash_fwd(q, k, v, case.causal, 0.125, **options)
    if backward:
        fa._flash_bwd(torch.randn_like(q), q, k, v, o, torch.zeros(q.shape[:3]), case.causal, 0.125,
                      deterministic=options.get("deterministic", True))


def chosen(log, kernel):
    record = [r for r in log if r["kernel"] == LAUNCHED.get(kernel, kernel)][-1]
    kwargs = record["kwargs"]
    return triton.Config({name: kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "USE_TMA", "WARP_SPECIALIZE")
                          if name in kwargs}, num_warps=kwargs["num_warps"], num_stages=kwargs["num_stages"])


def footprint(arch, kernel, dtype, head_dim, config):
    padded = head_dim if head_dim > 256 else triton.next_power_of_2(max(16, head_dim))  # 576: MLA's tiles, unpadded
    key = configs.footprint_key(kernel, configs.PRECISIONS[dtype], padded, config)
    return configs.footprints()[arch].get(key)


CASES = [
    AttentionCase(batch=1, h_q=4, h_kv=2, n_q=4096, n_k=4096, head_dim=128, causal=True),
    AttentionCase(batch=1, h_q=4, h_kv=1, n_q=2000, n_k=3000, head_dim=256, causal=False),
    AttentionCase(batch=2, h_q=2, h_kv=2, n_q=20, n_k=20, head_dim=40, causal=True),
    AttentionCase(batch=1, h_q=8, h_kv=2, n_q=1, n_k=1000, head_dim=128, causal=True),  # one query row
    AttentionCase(batch=1, h_q=2, h_kv=2, n_q=3000, n_k=24, head_dim=64, causal=False),  # a long prompt, 24 keys
]


# ----------------------------------------------------------------------------
# Every chip gets configs that fit it
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(configs.CHIPS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_every_launched_config_fits_the_chip(on_chip, launches, arch, dtype):
    """The config of each launch was measured on that chip, fits its shared memory and its sequence."""
    chip = on_chip(arch)
    for case in CASES:
        run_flash(case, dtype)
        for kernel in LAUNCHED:
            config = chosen(launches, kernel)
            measured = footprint(arch, kernel, dtype, case.head_dim, config)
            assert measured is not None, f"{kernel} on {arch}: {configs.config_label(config)} was never compiled there"
            assert measured[0] <= chip.shared_bytes, f"{kernel} on {arch}: {measured[0]} B of shared memory"
            bucket_m, bucket_n = configs.length_bucket(case.n_q), configs.length_bucket(case.n_k)
            fitting = configs.KERNELS[kernel].fitting(chip, dtype, triton.next_power_of_2(max(16, case.head_dim)))
            assert config.kwargs["BLOCK_M"] <= max(bucket_m, min(c.kwargs["BLOCK_M"] for c in fitting)), case.id
            assert config.kwargs["BLOCK_N"] <= max(bucket_n, min(c.kwargs["BLOCK_N"] for c in fitting)), case.id


@pytest.mark.parametrize("arch", list(configs.CHIPS))
def test_paged_configs_fit_the_chip(on_chip, arch, device):
    """Paged attention: the tile of new tokens x a kv group's heads fits, from a decode step of a small group
    (4 rows) to a prefill chunk (thousands of rows), 16-bit and fp32, up to MLA's 576 (512 + 64) tiles."""
    chip = on_chip(arch)
    for dtype in (torch.bfloat16, torch.float32):
        for head_dim in (64, 128, 256, 576):
            for rows in (1, 4, 16, 64, 4096):
                config = configs.KERNELS["paged"].choose(torch.device("cpu"), dtype, max(16, head_dim), rows, None,
                                                         (("PAGED", True), ("IS_CAUSAL", True)))
                measured = footprint(arch, "paged", dtype, head_dim, config)
                assert measured is not None and measured[0] <= chip.shared_bytes, (arch, dtype, head_dim, rows)
                assert config.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(rows)), (arch, rows, config)
                if configs.PRECISIONS[dtype] == "16-bit" and head_dim <= 128:
                    assert measured[1] <= configs.SPILL_TOLERANCE_BYTES, (
                        f"paged {dtype} d{head_dim} on {arch} spills {measured[1]} B")


def test_a_chip_with_too_little_shared_memory_gets_a_clear_error(launches, monkeypatch):
    """Nothing fits: the error names the chip, the dtype and the head dim (not a launch failure deep in Triton)."""
    tiny = configs.Chip("sm_86", (8, 6), 8192, "a made-up GPU")
    monkeypatch.setattr(configs, "chip_for", lambda device: tiny)
    configs.reset()
    with pytest.raises(configs.NoConfigFits, match=r"sm_86 \(a made-up GPU; 8,192 B.*bfloat16 at head dim 128"):
        run_flash(CASES[0], torch.bfloat16, backward=False)
    configs.reset()


def test_unlisted_chips_take_their_family_s_configs_within_their_own_memory():
    orin = configs.chip_for_capability((8, 7), 166_912, "Jetson AGX Orin")
    assert (orin.arch, orin.shared_bytes) == ("sm_86", 166_912)
    spark = configs.chip_for_capability((12, 1), None)
    assert (spark.arch, spark.shared_bytes) == ("sm_120", 101_376)
    assert configs.chip_for_capability((9, 0), 232_448) is configs.CHIPS["sm_90"]
    with pytest.raises(RuntimeError, match="sm_75.*sm_80"):
        configs.chip_for_capability((7, 5), 65_536, "Tesla T4")


# ----------------------------------------------------------------------------
# No timing unless asked; never into the caller's buffers
# ----------------------------------------------------------------------------
@pytest.fixture
def stand_in_timer(monkeypatch):
    """configs.TIMER replaced: runs the timed call three times (as do_bench would, and more) and makes up a time."""
    timed = []

    def timer(run):
        for _ in range(3):
            run()
        timed.append(run)
        return float(len(timed))  # the first config timed wins
    monkeypatch.setattr(configs, "TIMER", timer)
    return timed


def test_nothing_is_timed_unless_autotuning_is_on(on_chip, launches, stand_in_timer):
    on_chip("sm_90")
    for case in CASES:
        run_flash(case, torch.bfloat16, deterministic=False)
    assert stand_in_timer == [], "a call timed configs with autotuning off"


def test_deterministic_calls_are_never_timed(on_chip, launches, stand_in_timer, monkeypatch):
    on_chip("sm_90")
    monkeypatch.setattr(configs, "_autotune", True)
    run_flash(CASES[0], torch.bfloat16, deterministic=True)
    assert stand_in_timer == [], "deterministic mode timed configs"
    run_flash(CASES[0], torch.bfloat16, deterministic=False)
    assert stand_in_timer, "autotuning on and deterministic=False timed nothing"


def test_no_timing_during_cuda_graph_capture(on_chip, launches, stand_in_timer, monkeypatch):
    on_chip("sm_90")
    monkeypatch.setattr(configs, "_autotune", True)
    monkeypatch.setattr(configs, "_capturing", lambda device: True)
    run_flash(CASES[0], torch.bfloat16, deterministic=False)
    assert stand_in_timer == []


def test_set_autotune_takes_a_bool_and_forgets_earlier_choices(on_chip, launches):
    on_chip("sm_90")
    run_flash(CASES[0], torch.bfloat16, backward=False)
    assert configs.KERNELS["fwd"].memo
    try:
        configs.set_autotune(True)
        assert configs.autotune_enabled() and not configs.KERNELS["fwd"].memo
    finally:
        configs.set_autotune(False)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        configs.set_autotune(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_timing_runs_never_touch_the_callers_gradients(on_chip, stand_in_timer, monkeypatch, dtype):
    """The fused backward adds dQ with atomics into a buffer zeroed once. Timed in place, every timing run of
    every config would add into it again (issue 16: dQ came out 7x too large). Timed into scratch, the first
    call is right: real kernels, under the interpreter, with an H100's candidates and a timer that runs each
    config three times."""
    on_chip("sm_90")
    monkeypatch.setattr(configs, "_autotune", True)
    case = AttentionCase(batch=1, h_q=4, h_kv=2, n_q=64, n_k=64, head_dim=64, causal=True)
    q, k, v = case.make_inputs(dtype, "cpu", requires_grad=True)
    do = torch.randn_like(q)
    o = ops.flash_attention(q, k, v, causal=True, deterministic=False)
    grads = torch.autograd.grad(o, (q, k, v), do)
    assert stand_in_timer, "no config was timed: the test proves nothing"
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64 = naive_attention(q64, k64, v64, True)
    grads64 = torch.autograd.grad(o64, (q64, k64, v64), do.double())
    same_dtype = torch.autograd.grad(naive_attention(q, k, v, True), (q, k, v), do)
    assert_close_to_reference(o, o64, naive_attention(q, k, v, True), name="o")
    for name, grad, grad64, grad_same in zip("qkv", grads, grads64, same_dtype):
        assert_close_to_reference(grad, grad64, grad_same, factor=GRADIENT_FACTOR, name=f"d{name}")


# ----------------------------------------------------------------------------
# Tuned tables: python -m bench.tune writes them, the launchers read them
# ----------------------------------------------------------------------------
def test_a_tuned_table_entry_is_used_when_it_fits(on_chip, launches, tmp_path, monkeypatch):
    chip = on_chip("sm_90")
    case = CASES[0]
    fitting = configs.KERNELS["fwd"].fitting(chip, torch.bfloat16, 128)
    wanted = fitting[-1]  # not the default choice
    key = configs.table_key("fwd", torch.bfloat16, 128, (("IS_CAUSAL", True), ("HAS_WINDOW", False),
                                                          ("IS_GQA", True)), case.n_q, case.n_k)
    table = {"gpu": "sm_90", "arch": "sm_90", "entries": {key: configs.config_label(wanted),
                                                          "fwd bfloat16 d128 full q16384 k16384": "M999 N1 w1 s1"}}
    (tmp_path / "some-h100.json").write_text(json.dumps(table))
    monkeypatch.setattr(configs, "TUNED_DIR", tmp_path)
    configs.reset()
    run_flash(case, torch.bfloat16, backward=False)
    assert configs.config_label(chosen(launches, "fwd")) == configs.config_label(wanted)
    # An entry that names no fitting candidate (an older list, another chip) is ignored.
    run_flash(AttentionCase(1, 4, 4, 16384, 16384, 128, False), torch.bfloat16, backward=False)
    assert chosen(launches, "fwd") in fitting


def test_table_keys_name_the_variant():
    switches = (("IS_CAUSAL", True), ("HAS_WINDOW", True), ("HAS_SOFTCAP", False), ("IS_VARLEN", True),
                ("IS_GQA", False))
    assert configs.table_key("bwd_dq", torch.float16, 64, switches, 1000, 3000) == \
        "bwd_dq float16 d64 causal+window+varlen q1024 k4096"


# ----------------------------------------------------------------------------
# The same bits in every process
# ----------------------------------------------------------------------------
PROBE = """
import hashlib, sys, torch
import kernels
from tests.cases import AttentionCase
torch.manual_seed(0)
q, k, v = AttentionCase(1, 4, 2, 97, 130, 48, True).make_inputs(torch.bfloat16, "cpu", requires_grad=True)
o = kernels.flash_attention(q, k, v, causal=True)
o.backward(torch.ones_like(o))
digest = hashlib.sha256()
for t in (o, q.grad, k.grad, v.grad):
    digest.update(t.detach().float().numpy().tobytes())
print(digest.hexdigest())
"""


def test_two_processes_give_bitwise_equal_gradients_with_the_gpu_tables():
    """deterministic=True (the default), an RTX 3090's configs (ATTN_CHIP=sm_86), autotuning switched on: the
    config is still chosen without timing, so two processes give the same bits."""
    env = {**os.environ, "TRITON_INTERPRET": "1", configs.CHIP_ENV: "sm_86", configs.AUTOTUNE_ENV: "1"}
    digests = [subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600) for _ in range(2)]
    for run in digests:
        assert run.returncode == 0, run.stderr[-2000:]
    assert digests[0].stdout == digests[1].stdout and len(digests[0].stdout.strip()) == 64


# ----------------------------------------------------------------------------
# Forced configs, and the Hopper options offered only where they can run
# ----------------------------------------------------------------------------
def test_only_config_forces_one_config_and_restores_the_choice(on_chip, launches):
    on_chip("sm_90")
    forced = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=2, num_stages=5)
    for name in LAUNCHED:
        with configs.only_config(name, forced):
            run_flash(CASES[0], torch.bfloat16)
            assert configs.config_label(chosen(launches, name)) == configs.config_label(forced), name
        run_flash(CASES[0], torch.bfloat16)
        assert configs.config_label(chosen(launches, name)) != configs.config_label(forced), f"{name}: still forced"


def test_only_config_rejects_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        configs.only_config("forward", triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}))
    with pytest.raises(TypeError, match="config"):
        configs.only_config("fwd", {"BLOCK_M": 16, "BLOCK_N": 16})


@pytest.mark.parametrize("name", list(LAUNCHED))
def test_only_config_runs_the_real_kernel_with_that_config(name):
    """The tuning bench's path: the public function, one kernel forced to a non-default tile, right results."""
    case = AttentionCase(batch=1, h_q=2, h_kv=1, n_q=37, n_k=45, head_dim=24, causal=True)
    q, k, v = case.make_inputs(torch.float32, "cpu", requires_grad=True)
    do = torch.randn_like(q)
    forced = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
    with configs.only_config(name, forced) as kernel:
        o = ops.flash_attention(q, k, v, causal=True)
        grads = torch.autograd.grad(o, (q, k, v), do)
        assert kernel.last_config is forced
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64 = naive_attention(q64, k64, v64, True)
    grads64 = torch.autograd.grad(o64, (q64, k64, v64), do.double())
    grads32 = torch.autograd.grad(naive_attention(q, k, v, True), (q, k, v), do)
    assert_close_to_reference(o, o64, naive_attention(q, k, v, True), name="o")
    for what, grad, grad64, grad32 in zip("qkv", grads, grads64, grads32):
        assert_close_to_reference(grad, grad64, grad32, factor=GRADIENT_FACTOR, name=f"d{what}")


def hopper_options(config):
    return config.kwargs.get("USE_TMA", False), config.kwargs.get("WARP_SPECIALIZE", False)


def test_hopper_options_are_offered_where_they_can_run(on_chip):
    fwd = configs.KERNELS["fwd"]

    def offered(arch, tma, warp_specialize, dtype=torch.bfloat16, head_dim_pad=128):
        return {hopper_options(c) for c in fwd.fitting(on_chip(arch), dtype, head_dim_pad, tma, warp_specialize)}

    assert offered("sm_86", True, True) == {(False, False)}, "descriptor configs offered on a chip without TMA"
    assert offered("sm_90", False, False) == {(False, False)}, "descriptor configs offered to inputs that forbid them"
    assert offered("sm_90", True, False) == {(False, False), (True, False)}
    assert offered("sm_90", True, True) == {(False, False), (True, False), (True, True)}
    assert offered("sm_90", True, True, torch.float32) == {(False, False)}
    # The default choice keeps the pointer path: the Hopper options come last in the list.
    assert hopper_options(fwd.fitting(on_chip("sm_90"), torch.bfloat16, 128, True, True)[0]) == (False, False)


def test_a_strided_view_never_reuses_a_descriptor_config(on_chip, launches, monkeypatch):
    """Whether the inputs allow descriptors is part of the choice's key: same shape, other layout, other choice."""
    on_chip("sm_90")
    tma_first = {key: sorted(configs_, key=lambda c: not hopper_options(c)[0])
                 for key, configs_ in configs.FWD_CANDIDATES.items()}
    monkeypatch.setattr(configs.KERNELS["fwd"], "candidates", tma_first)
    q, k, v = AttentionCase(1, 4, 2, 1000, 1000, 120, True).make_inputs(torch.bfloat16, "cpu")
    fa._flash_fwd(q, k, v, True, 0.125)
    assert hopper_options(chosen(launches, "fwd"))[0], "a descriptor config was not chosen first"
    wide = AttentionCase(1, 4, 2, 1000, 1000, 121, True).make_inputs(torch.bfloat16, "cpu")
    fa._flash_fwd(*(t[..., :120] for t in wide), True, 0.125)  # rows 242 bytes apart: no descriptors
    assert not hopper_options(chosen(launches, "fwd"))[0], "a strided view reused the descriptor config"


# ----------------------------------------------------------------------------
# Launch where the tensors are
# ----------------------------------------------------------------------------
def test_every_launch_runs_on_its_inputs_device(launches):
    """Triton launches on the current CUDA device: each launcher must make its inputs' device current first.

    On the CPU the recorder notes which device the launcher's guard made
    current at each launch; a launch outside a guard records None.
    """
    import kernels

    case = AttentionCase(batch=1, h_q=4, h_kv=2, n_q=40, n_k=40, head_dim=32, causal=True)
    run_flash(case, torch.float32, deterministic=True)
    run_flash(case, torch.float32, deterministic=False)
    q, k, v = case.make_inputs(torch.float32, "cpu")
    lengths = torch.tensor([40], dtype=torch.int32)
    paged._paged_fwd(q[:, :, :1], k, v, lengths, None, None, None, True, 0.125, num_splits=3)
    kernels.softmax(torch.randn(3, 5))
    fa.dropout_keep_mask(torch.zeros(1, dtype=torch.int64), 0.5, 1, 8, 8)
    names = {record["kernel"] for record in launches}
    assert {"_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq", "_paged_attn_fwd",
            "_paged_merge", "_softmax_online", "_dropout_mask_kernel"} <= names, names
    outside = [record["kernel"] for record in launches if record["device"] != torch.device("cpu")]
    assert not outside, f"launched without making the inputs' device current: {outside}"


def test_the_guard_makes_the_inputs_cuda_device_current(monkeypatch):
    """runtime.on_device enters torch.cuda.device for a CUDA tensor's device and does nothing on the CPU."""
    entered = []

    class FakeCudaDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    with runtime.on_device(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]
    assert entered == [torch.device("cuda", 1), "exit"]
    with runtime.on_device(torch.device("cpu")):
        pass
    assert len(entered) == 2


@pytest.mark.gpu
def test_fused_backward_is_right_with_autotuning_on_a_gpu(device):
    """The real timer (do_bench runs each config tens of times) on the fused backward: dQ must still be right on
    the very first call of a new shape, and the candidates were really timed."""
    case = AttentionCase(batch=1, h_q=8, h_kv=2, n_q=2048, n_k=2048, head_dim=128, causal=True)
    q, k, v = case.make_inputs(torch.bfloat16, device, requires_grad=True)
    do = torch.randn_like(q)
    configs.set_autotune(True)
    try:
        o = ops.flash_attention(q, k, v, causal=True, deterministic=False)
        grads = torch.autograd.grad(o, (q, k, v), do)
        timed = dict(configs.KERNELS["bwd_dkdv"].timings)
    finally:
        configs.set_autotune(False)
    assert timed, "autotuning timed no dK/dV config: the test proves nothing"
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    grads64 = torch.autograd.grad(naive_attention(q64, k64, v64, True), (q64, k64, v64), do.double())
    same_dtype = torch.autograd.grad(naive_attention(q, k, v, True), (q, k, v), do)
    for name, grad, grad64, grad_same in zip("qkv", grads, grads64, same_dtype):
        assert_close_to_reference(grad, grad64, grad_same, factor=GRADIENT_FACTOR, name=f"d{name}")


def test_the_descriptor_allocator_is_set_only_where_descriptors_can_run(on_chip, launches, monkeypatch):
    """Triton needs an allocator for on-device descriptors: set one on a TMA GPU, never replace the program's."""
    import contextvars

    from triton.runtime import _allocation

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


def test_fitting_ranks_spill_free_in_list_order_then_the_least_spilling():
    """Every kernel, chip, precision and head-dim class, plain and with variants: configs within
    SPILL_TOLERANCE_BYTES keep the candidate list's order; after them, where some or all spill, the least
    spilling comes first (with every switch on, all paged tiles spill on an A100, by 272 B to 37 KB)."""
    checked = 0
    for arch, chip in configs.CHIPS.items():
        measured = configs.footprints()[arch]
        for kernel, kernel_configs in configs.KERNELS.items():
            for (precision, head_dim_class), listed in kernel_configs.candidates.items():
                dtype = {"16-bit": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64,
                         "fp8": torch.float8_e4m3fn}[precision]
                for variants in (False, True):
                    ranked = kernel_configs.fitting(chip, dtype, head_dim_class, tma=True, warp_specialize=True,
                                                    variants=variants)
                    spills = [measured[configs.footprint_key(kernel, precision, head_dim_class, config)][
                        2 if variants else 1] for config in ranked]
                    clean = [config for config, spill in zip(ranked, spills) if spill <= configs.SPILL_TOLERANCE_BYTES]
                    assert clean == [config for config in listed if config in clean], (arch, kernel, precision)
                    rest = spills[len(clean):]
                    assert all(spill > configs.SPILL_TOLERANCE_BYTES for spill in rest) and rest == sorted(rest), (
                        arch, kernel, precision, head_dim_class, variants, spills)
                    checked += 1
    assert checked > 100
