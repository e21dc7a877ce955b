"""Launch configurations: the tile shapes each kernel may use, which of them fit which GPU, and how one is chosen.

A config is a tile shape (BLOCK_M query rows by BLOCK_N keys), a number of
warps and a number of pipeline stages. Each costs shared memory: every
pipeline stage keeps one more K and V tile in flight, and Hopper's wgmma reads
its operands from shared memory too. A config that asks for more than the
chip has does not launch, so which configs a chip may run is measured, not
guessed. Read in this order:

    chips        the GPUs the kernels are built for, and the shared memory one block may use on each
    candidates   per kernel, precision and head-dim class: the tile shapes, best first
    footprints   each candidate's shared memory and register spills on each chip, measured by compiling
                 it with Triton's bundled ptxas (kernels/footprints.json, written by
                 `python -m tests.gpu_compile --write-footprints`): a candidate runs on a chip only
                 if it was measured there and fits
    choose       the config of one launch: a tuned table's entry for this GPU, else the first candidate
                 that fits the chip, does not spill (at most SPILL_TOLERANCE_BYTES; where every
                 candidate spills, the one that spills least), and is no longer than the sequence. Memoized per
                 (device, dtype, head dim, switches, length buckets): one dict lookup per launch
    tuned tables kernels/tuned/<gpu>.json, written by `python -m bench.tune` on that GPU
    autotuning   opt-in (ATTN_AUTOTUNE=1 or set_autotune(True)): time the fitting candidates once per
                 key, into scratch buffers, so no timing run touches a caller's tensor

Nothing is timed at run time by default: a call inside CUDA-graph capture
never meets a tuner, and deterministic mode picks the same config in every
process, so its gradients are the same bits everywhere.

Under the interpreter one fixed config runs (its blocks large enough to keep
the program count, and so the CPU time, small), unless ATTN_CHIP names a chip
(ATTN_CHIP=sm_86): then the CPU runs what that chip would, to test the choice.
"""
import dataclasses
import functools
import json
import os
from pathlib import Path

import torch
import triton
import triton.testing

HERE = Path(__file__).resolve().parent
FOOTPRINTS_PATH = HERE / "footprints.json"
TUNED_DIR = HERE / "tuned"
AUTOTUNE_ENV = "ATTN_AUTOTUNE"
CHIP_ENV = "ATTN_CHIP"
MAX_LENGTH_BUCKET = 16384  # longer sequences share the 16k bucket: tiles of <= 128 never notice


# ----------------------------------------------------------------------------
# Chips
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Chip:
    """A GPU architecture as the configs see it: its name for Triton, and the shared memory per block."""
    arch: str  # "sm_90": Triton's target, and the footprints' key
    capability: tuple
    shared_bytes: int  # the opt-in maximum of shared memory one block may use
    examples: str

    @property
    def has_tma(self) -> bool:
        """The tensor-memory accelerator behind descriptor loads: Hopper and later."""
        return self.capability >= (9, 0)

    def describe(self) -> str:
        return f"{self.arch} ({self.examples}; {self.shared_bytes:,} B of shared memory per block)"


# The opt-in maximum of shared memory per block, from NVIDIA's tuning guides (cudaDevAttrMaxSharedMemoryPerBlockOptin).
CHIPS = {chip.arch: chip for chip in (
    Chip("sm_80", (8, 0), 166_912, "A100, A30"),
    Chip("sm_86", (8, 6), 101_376, "RTX 3080 Ti, RTX 3090, A10, A40"),
    Chip("sm_89", (8, 9), 101_376, "RTX 4090, L4, L40S"),
    Chip("sm_90", (9, 0), 232_448, "H100, H200"),
    Chip("sm_100", (10, 0), 232_448, "B200, GB200"),
    Chip("sm_120", (12, 0), 101_376, "RTX 5090, RTX PRO 6000"),
)}
OLDEST = (8, 0)  # bf16 tensor cores and cp.async: Ampere and later


def chip_for_capability(capability, shared_bytes=None, name=None) -> Chip:
    """The Chip of a GPU with this capability: a known one, or the nearest known one below it.

    An unlisted chip (sm_87 Jetson Orin, sm_103, sm_121) runs the configs
    measured on the nearest listed architecture of the same family below it,
    within its own shared memory (`shared_bytes`, as the driver reports it).
    """
    capability = tuple(capability)
    if capability < OLDEST:
        gpu = f"{name} " if name else ""
        raise RuntimeError(f"GPU {gpu}(sm_{capability[0]}{capability[1]}) is older than the kernels support: they need "
                           f"sm_80 (Ampere) or newer, for bf16 tensor cores and asynchronous copies")
    known = [chip for chip in CHIPS.values() if chip.capability <= capability]
    nearest = max(known, key=lambda chip: chip.capability)
    if nearest.capability == capability and shared_bytes in (None, nearest.shared_bytes):
        return nearest
    return dataclasses.replace(nearest, capability=capability,
                               shared_bytes=shared_bytes if shared_bytes else nearest.shared_bytes,
                               examples=name or f"sm_{capability[0]}{capability[1]}, configs of {nearest.arch}")


@functools.lru_cache(maxsize=None)
def _cuda_chip(index) -> Chip:
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", None)
    return chip_for_capability((props.major, props.minor), shared, props.name)


def chip_for(device: torch.device):
    """The Chip whose configs `device` runs; None under the interpreter (one fixed config) unless ATTN_CHIP is set."""
    if device.type == "cuda":
        return _cuda_chip(device.index if device.index is not None else torch.cuda.current_device())
    emulated = os.environ.get(CHIP_ENV)
    if not emulated:
        return None
    if emulated not in CHIPS:
        raise ValueError(f"{CHIP_ENV}={emulated!r} names no chip; known: {', '.join(CHIPS)}")
    return CHIPS[emulated]


# ----------------------------------------------------------------------------
# Candidates: per kernel, {(precision, head-dim class): configs, best first}
#
# fp16/bf16 use the tensor cores (wgmma on Hopper, mma before). Registers
# limit the tiles: 255 per thread, and a 128 x 128 fp32 accumulator is 64
# registers per thread at 8 warps. Shared memory limits the stages: a 64-key
# tile of K and V at head dim 128 is 32 KB in 16 bits, per stage. The lists
# run from the tiles an H100 wants (227 KB of shared memory) down to those an
# RTX 3090 or 4090 can hold (99 KB), so every chip finds its best fitting
# config early; the footprints decide which fit (see above).
#
# fp32 and fp64 multiply in true fp32/fp64 on the CUDA cores (no tf32), need
# far more registers per tile, compile slowly and are not the speed path:
# small tiles, a short list.
#
# The forward's Hopper options come last in their lists, so a default choice
# keeps the pointer path: USE_TMA loads Q, K and V with TMA copies from tensor
# descriptors, and WARP_SPECIALIZE, with TMA, splits the key loop into a
# producer warp group and consumer warp groups (num_warps = 4: the compiler
# adds the consumers itself). They are offered only where the inputs allow
# descriptors and the chip has TMA, and warp specialization only to the plain
# non-causal key loop.
# ----------------------------------------------------------------------------
PRECISIONS = {torch.float16: "16-bit", torch.bfloat16: "16-bit", torch.float32: "fp32", torch.float64: "fp64",
              torch.float8_e4m3fn: "fp8", torch.float8_e5m2: "fp8"}
HEAD_DIM_CLASSES = (128, 256, 576)  # a padded head dim takes the smallest class that holds it (576: MLA decode)


def _configs(*shapes, **options):
    """triton.Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples, each with the constexpr `options`."""
    return [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, **options}, num_warps=warps, num_stages=stages)
            for block_m, block_n, warps, stages in shapes]


_TMA = dict(USE_TMA=True)
_TMA_WS = dict(USE_TMA=True, WARP_SPECIALIZE=True)
FWD_CANDIDATES = {
    ("16-bit", 128): _configs((128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 8, 2), (128, 64, 8, 4),
                              (64, 64, 4, 3), (128, 32, 4, 2), (64, 64, 4, 2), (64, 32, 4, 2))
    + _configs((128, 64, 8, 3), (128, 128, 8, 2), **_TMA) + _configs((128, 64, 4, 3), (128, 128, 4, 2), **_TMA_WS),
    ("16-bit", 256): _configs((128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2), (64, 32, 4, 1),
                              (32, 32, 4, 1))
    + _configs((128, 64, 8, 2), **_TMA),
    # fp8 (forward only, sm_89 and later): a K or V tile is half the bytes of a 16-bit one, so the key
    # tiles double; the fp8 MMA's K is 32 (head dims pad to at least 32, key tiles are at least 32).
    ("fp8", 128): _configs((128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 2), (64, 64, 4, 2))
    + _configs((128, 128, 8, 3), **_TMA) + _configs((128, 128, 4, 3), **_TMA_WS),
    ("fp8", 256): _configs((128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)) + _configs((128, 64, 8, 2), **_TMA),
    ("fp32", 128): _configs((16, 16, 4, 2), (16, 32, 8, 2), (16, 16, 8, 1), (16, 16, 4, 1)),
    ("fp32", 256): _configs((16, 16, 4, 2), (16, 16, 4, 1)),
    ("fp64", 128): _configs((16, 16, 4, 2), (16, 16, 4, 1)),
    ("fp64", 256): _configs((16, 16, 4, 1)),
}
DKDV_CANDIDATES = {
    # dK/dV holds two key tiles and two accumulators and walks 16-row query tiles; fused dQ
    # (deterministic=False) adds a third product: the small tiles keep it out of local memory.
    ("16-bit", 128): _configs((16, 128, 8, 2), (16, 64, 4, 2), (16, 32, 8, 2), (16, 32, 4, 2), (16, 16, 8, 1)),
    ("16-bit", 256): _configs((16, 32, 8, 2), (16, 32, 8, 3), (16, 32, 4, 1), (16, 16, 8, 1), (16, 16, 4, 1)),
    ("fp32", 128): _configs((16, 64, 8, 2), (16, 32, 4, 2), (16, 16, 8, 1), (16, 16, 4, 1)),
    ("fp32", 256): _configs((16, 32, 8, 2), (16, 16, 4, 1)),
    ("fp64", 128): _configs((16, 16, 8, 1), (16, 16, 4, 1)),
    ("fp64", 256): _configs((16, 16, 4, 1)),
}
DQ_CANDIDATES = {
    ("16-bit", 128): _configs((128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3),
                              (64, 32, 8, 3), (64, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)),
    ("16-bit", 256): _configs((128, 32, 8, 2), (64, 32, 8, 2), (64, 32, 4, 1), (32, 32, 4, 1), (16, 32, 4, 1)),
    ("fp32", 128): _configs((32, 64, 8, 2), (16, 32, 4, 2), (16, 16, 8, 1), (16, 16, 4, 1)),
    ("fp32", 256): _configs((16, 32, 8, 2), (16, 16, 4, 1)),
    ("fp64", 128): _configs((16, 32, 8, 2), (16, 16, 4, 1)),
    ("fp64", 256): _configs((16, 16, 4, 1)),
}
# Paged attention (kernels/paged.py): BLOCK_M rows of new tokens x the query heads of a kv group (GQA
# packing), BLOCK_N keys. The rows come from the call (group x the longest run of new tokens): the
# longest row tile that holds them and fits is chosen, 16 rows for a decode step of a small group,
# 128 for a prefill chunk. The 576 class is MLA's absorbed decode (q/k 512 + 64, v 512, one kv head):
# its 512-wide fp32 accumulator is what limits the rows.
PAGED_CANDIDATES = {
    ("16-bit", 128): _configs((128, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (16, 64, 4, 2)),
    ("16-bit", 256): _configs((64, 32, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)),
    ("16-bit", 576): _configs((64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 4, 1)),
    ("fp32", 128): _configs((32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 8, 2), (16, 16, 4, 1)),
    ("fp32", 256): _configs((16, 32, 4, 2), (16, 16, 4, 2), (16, 16, 4, 1)),
    ("fp32", 576): _configs((16, 16, 8, 1), (16, 16, 4, 1)),
}

# Under the interpreter: BLOCK_M != BLOCK_N so the tests exercise uneven causal splits.
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)


def head_dim_class(head_dim_pad: int) -> int:
    for size in HEAD_DIM_CLASSES:
        if head_dim_pad <= size:
            return size
    return head_dim_pad


def config_label(config) -> str:
    """'M128 N64 w8 s3', and ' tma' / ' ws' for the Hopper options: how footprints and tuned tables name a config."""
    label = f"M{config.kwargs['BLOCK_M']} N{config.kwargs['BLOCK_N']} w{config.num_warps} s{config.num_stages}"
    if config.kwargs.get("USE_TMA"):
        label += " tma"
    if config.kwargs.get("WARP_SPECIALIZE"):
        label += " ws"
    return label


def footprint_key(kernel: str, precision: str, head_dim_pad: int, config) -> str:
    """'fwd 16-bit d128 M128 N64 w8 s3': one candidate, at its head-dim class."""
    return f"{kernel} {precision} d{head_dim_class(head_dim_pad)} {config_label(config)}"


# ----------------------------------------------------------------------------
# Footprints and tuned tables: JSON files next to this one
# ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def footprints() -> dict:
    """{arch: {footprint_key: (shared bytes, spill bytes plain, spill bytes with variants)}}, measured by compiling.

    Shared memory is the larger of the plain and the every-switch compile (a config must fit
    whatever switches a call brings); spill-store bytes per thread are kept apart, so a plain
    call ranks configs by the plain kernel's spills and a call with variants by the worst case.
    """
    if not FOOTPRINTS_PATH.exists():
        return {}
    with open(FOOTPRINTS_PATH) as f:
        data = json.load(f)
    return {arch: {key: (value[0], value[1], value[-1]) for key, value in table.items()}
            for arch, table in data["archs"].items()}


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': a tuned table's file name."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


@functools.lru_cache(maxsize=None)
def tuned_table(gpu_name: str, arch: str) -> dict:
    """{table key: config label}: kernels/tuned/<gpu>.json for this GPU, else merged tables of its architecture."""
    exact = TUNED_DIR / f"{gpu_slug(gpu_name)}.json"
    paths = [exact] if exact.exists() else sorted(TUNED_DIR.glob("*.json")) if TUNED_DIR.exists() else []
    entries = {}
    for path in paths:
        with open(path) as f:
            table = json.load(f)
        if path == exact or table.get("arch") == arch:
            for key, label in table["entries"].items():
                entries.setdefault(key, label)
    return entries


def table_key(kernel, dtype, head_dim_pad, switches, n_q, n_k) -> str:
    """'fwd bfloat16 d128 causal q4096 k4096': the tuned tables' key of one launch.

    switches: the kernel's compile-time flags; those that are on name the
    variant ('causal', 'full', 'causal+window+varlen', ...).
    """
    on = [name.lower().removeprefix("has_").removeprefix("is_") for name, value in switches if value is True]
    variant = "causal" if "causal" in on else "full"
    extra = [name for name in on if name != "causal"]
    dtype_name = str(dtype).removeprefix("torch.")
    return (f"{kernel} {dtype_name} d{head_dim_pad} {'+'.join([variant, *extra])} "
            f"q{length_bucket(n_q)} k{length_bucket(n_k)}")


def length_bucket(n):
    """n rounded up to a power of two, capped: lengths in one bucket share a config."""
    return None if n is None else min(1 << (max(int(n), 1) - 1).bit_length(), MAX_LENGTH_BUCKET)


# ----------------------------------------------------------------------------
# Choosing
# ----------------------------------------------------------------------------
_autotune = os.environ.get(AUTOTUNE_ENV) == "1"


def set_autotune(enabled: bool) -> None:
    """Turn runtime autotuning on or off for this process (off by default; ATTN_AUTOTUNE=1 turns it on)."""
    global _autotune
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    _autotune = enabled
    for kernel in KERNELS.values():
        kernel.memo.clear()


def autotune_enabled() -> bool:
    return _autotune


_reset_hooks = []


def on_reset(hook) -> None:
    """Call `hook()` on every reset() and at both ends of an only_config block: for launchers that keep plans
    holding a chosen config (kernels/paged.py)."""
    _reset_hooks.append(hook)


def reset() -> None:
    """Forget every choice and re-read the footprints and tuned tables (tests that change ATTN_CHIP or the files)."""
    for kernel in KERNELS.values():
        kernel.memo.clear()
        kernel.timings.clear()
    footprints.cache_clear()
    tuned_table.cache_clear()
    for hook in _reset_hooks:
        hook()


# The switches on in the plain compile of tests/gpu_compile.py, besides which any switch on makes a call one
# "with variants" (ranked by the every-switch compile's spills). Paged attention's plain compile is a
# serving step: a packed batch over a paged cache.
PLAIN_SWITCHES = frozenset({"IS_CAUSAL", "IS_GQA"})
PAGED_PLAIN_SWITCHES = PLAIN_SWITCHES | {"PAGED", "IS_VARLEN"}


# Spill-store bytes per thread a config may have and still rank as spill-free: one or two registers parked
# (Triton 3.9 spills 4 B in the H100's dK/dV tile, M16 N128 w8 s2, where 3.6 spills none) cost less than
# falling back to a tile too narrow for wgmma.
SPILL_TOLERANCE_BYTES = 8


class NoConfigFits(ValueError):
    """No candidate of a kernel fits the chip for this dtype and head dim."""


class KernelConfigs:
    """The candidates of one kernel, and the choice among them for each launch."""

    def __init__(self, name: str, candidates: dict, interpreter=lambda dtype, head_dim_pad, n_q, n_k: INTERPRETER_CONFIG,
                 plain_switches=PLAIN_SWITCHES):
        self.name = name
        self.candidates = candidates
        self.plain_switches = plain_switches  # on in the plain compile: a call with no other switch on is plain
        self.interpreter = interpreter  # (dtype, head_dim_pad, n_q, n_k) -> the config the CPU runs
        self.memo = {}  # (device, dtype, head dim, switches, buckets, options) -> Config
        self.forced = None  # only_config's config
        self.last_config = None  # the config of the latest launch, for tests and bench.tune
        self.last_table_key = None  # the tuned-table key of the latest fresh choice, for bench.tune
        self.timings = {}  # table key -> {config label: ms}, what autotuning measured

    def all_configs(self):
        return list(dict.fromkeys(config for configs in self.candidates.values() for config in configs))

    def fitting(self, chip: Chip, dtype, head_dim_pad: int, tma=False, warp_specialize=False, variants=False):
        """The candidates `chip` can run for this dtype and head dim: measured there, within its shared memory.

        Sorted spill-free first (at most SPILL_TOLERANCE_BYTES of spill stores; in the list's order),
        then the others by their spills, least first: the spills of the plain compile or, with
        `variants` (a call with switches beyond the plain compile's), of the every-switch compile.
        Descriptor and warp-specialized configs only where allowed.
        """
        precision = PRECISIONS.get(dtype)
        if precision is None:
            raise TypeError(f"no GPU launch configs for dtype {dtype}")
        measured = footprints().get(chip.arch, {})
        fits = []
        for config in self.candidates.get((precision, head_dim_class(head_dim_pad)), ()):
            if (config.kwargs.get("USE_TMA") and not (tma and chip.has_tma)) or (
                    config.kwargs.get("WARP_SPECIALIZE") and not warp_specialize):
                continue
            footprint = measured.get(footprint_key(self.name, precision, head_dim_pad, config))
            if footprint is not None and footprint[0] <= chip.shared_bytes:
                spills = footprint[2 if variants else 1]
                fits.append((0 if spills <= SPILL_TOLERANCE_BYTES else spills, config))
        return [config for _, config in sorted(fits, key=lambda item: item[0])]

    def choose(self, device, dtype, head_dim_pad, n_q, n_k, switches, *, tma=False, warp_specialize=False,
               deterministic=True, timing=None):
        """The config of one launch. switches: a tuple of (name, value) compile-time flags, in a fixed order.

        n_q / n_k: the lengths the tiles run along (None: not pruned). timing:
        a callable config -> ms that launches into scratch buffers, used only
        when autotuning is on and the call is not deterministic.
        """
        if self.forced is not None:
            return self.forced
        key = (device, dtype, head_dim_pad, switches, length_bucket(n_q), length_bucket(n_k), tma, warp_specialize)
        config = self.memo.get(key)
        if config is None:
            config = self._choose(device, dtype, head_dim_pad, n_q, n_k, switches, tma, warp_specialize,
                                  timing if (_autotune and not deterministic) else None)
            self.memo[key] = config
        return config

    def _choose(self, device, dtype, head_dim_pad, n_q, n_k, switches, tma, warp_specialize, timing):
        chip = chip_for(device)
        if chip is None:
            return self.interpreter(dtype, head_dim_pad, n_q, n_k)
        variants = any(value and name not in self.plain_switches for name, value in switches)
        fitting = self.fitting(chip, dtype, head_dim_pad, tma, warp_specialize, variants)
        if not fitting:
            raise NoConfigFits(
                f"no {self.name} launch configuration fits {chip.describe()} for {str(dtype).removeprefix('torch.')} "
                f"at head dim {head_dim_pad} (padded)")
        pruned = prune_to_lengths(fitting, n_q, n_k)
        key = self.last_table_key = table_key(self.name, dtype, head_dim_pad, switches, n_q, n_k)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else chip.arch
        label = tuned_table(gpu, chip.arch).get(key)
        chosen = next((config for config in pruned if config_label(config) == label), None)
        if chosen is not None:
            return chosen
        if timing is not None and len(pruned) > 1 and not _capturing(device):
            times = {config: timing(config) for config in pruned}
            self.timings[key] = {config_label(config): ms for config, ms in times.items()}
            return min(times, key=times.get)
        return pruned[0]


def prune_to_lengths(configs, n_q, n_k):
    """Drop tiles longer than their sequence: they only compute padding.

    BLOCK_M is pruned against N_Q and BLOCK_N against N_K, each at its length
    bucket, keeping at least the shortest tiles of the list (one query row
    still needs a 16-row tile).
    """
    shortest_m = min(config.kwargs["BLOCK_M"] for config in configs)
    shortest_n = min(config.kwargs["BLOCK_N"] for config in configs)
    rows, cols = length_bucket(n_q), length_bucket(n_k)
    kept = [config for config in configs
            if (rows is None or config.kwargs["BLOCK_M"] <= max(rows, shortest_m))
            and (cols is None or config.kwargs["BLOCK_N"] <= max(cols, shortest_n))]
    return kept or configs[:1]


def _capturing(device) -> bool:
    """Whether a CUDA graph is being captured on this device's current stream: no timing may run then."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _paged_on_the_interpreter(dtype, head_dim_pad, n_q, n_k):
    """The fewest padded rows (the interpreter pays for every one), and key rows of at most 256 bytes."""
    rows = max(16, min(64, triton.next_power_of_2(n_q)))
    keys = 64 if head_dim_pad * dtype.itemsize <= 256 else 32
    return triton.Config({"BLOCK_M": rows, "BLOCK_N": keys}, num_warps=4, num_stages=1)


KERNELS = {
    "fwd": KernelConfigs("fwd", FWD_CANDIDATES),
    "bwd_dkdv": KernelConfigs("bwd_dkdv", DKDV_CANDIDATES),
    "bwd_dq": KernelConfigs("bwd_dq", DQ_CANDIDATES),
    "paged": KernelConfigs("paged", PAGED_CANDIDATES, _paged_on_the_interpreter, PAGED_PLAIN_SWITCHES),
}


class only_config:
    """Within the block, kernel `name` launches `config` for every shape, untimed and unchecked (tests, bench.tune).

    Its memo and the launchers' plans are cleared on entry and exit, so no choice made inside leaks out
    and none made before is reused inside.
    A config that cannot fit the shape fails at launch (Triton's OutOfResources).
    """

    def __init__(self, name, config):
        if name not in KERNELS:
            raise ValueError(f"name must be one of {sorted(KERNELS)}, got {name!r}")
        if not isinstance(config, triton.Config):
            raise TypeError(f"config must be a triton.Config, got {type(config).__name__}")
        self.kernel, self.config = KERNELS[name], config

    def __enter__(self):
        self.saved = self.kernel.forced
        self.kernel.forced = self.config
        self._forget_choices()
        return self.kernel

    def __exit__(self, *exc):
        self.kernel.forced = self.saved
        self._forget_choices()
        return False

    def _forget_choices(self):
        self.kernel.memo.clear()
        for hook in _reset_hooks:  # launch plans that hold a config chosen before (or inside) the block
            hook()


def _do_bench(run) -> float:
    """Milliseconds per run of `run`, the median of Triton's do_bench (warm-up and compile excluded)."""
    return triton.testing.do_bench(run, return_mode="median")


TIMER = _do_bench  # tests put a stand-in here: the CPU has no GPU timer


def launch(configs, kernel, grid, args, constexprs, *, dtype, n_q, n_k, switches, tma=False, warp_specialize=False,
           deterministic=True, scratch=None, check=None, fits=None):
    """Choose the config of one launch of `kernel` (a KernelConfigs' kernel) and launch it. Returns the config.

    grid: config -> the launch grid. constexprs: the kernel's compile-time
    arguments but the config's own (HEAD_DIM_PAD among them). scratch: () ->
    args whose output tensors are fresh buffers, for timing runs when autotuning
    is on: no timing run ever writes, or adds into, a caller's tensor.
    check: config -> None, raising if a forced config (only_config) cannot run
    this call. fits: config -> None, raising if the chosen config cannot serve this call (a
    block mask's blocks smaller than its tiles). The caller has made the inputs' device
    current (runtime.on_device).
    """
    timing = None
    if _autotune and not deterministic and scratch is not None:
        def timing(config):
            scratch_args = scratch()
            return TIMER(lambda: kernel[grid(config)](*scratch_args, **constexprs, **config.all_kwargs()))
    # The wider of the query/key and value tiles decides what fits (MLA's values are narrower).
    head_dim_pad = max(constexprs["HEAD_DIM_PAD"], constexprs.get("HEAD_DIM_V_PAD", 0))
    config = configs.choose(args[0].device, dtype, head_dim_pad, n_q, n_k, switches, tma=tma,
                            warp_specialize=warp_specialize, deterministic=deterministic, timing=timing)
    if check is not None and configs.forced is not None:
        check(config)
    if fits is not None:
        fits(config)
    configs.last_config = config
    kernel[grid(config)](*args, **constexprs, **config.all_kwargs())
    return config
