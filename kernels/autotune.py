"""Launch configurations: the tile shapes each attention kernel may use, and how one is chosen.

On a GPU each kernel is autotuned over a short, curated list of block shapes;
under the interpreter there is no GPU to time configs on, and one fixed config
is used. Read in this order:

    config lists      per kernel, per precision and head-dim class (<= 128, 256); the forward's
                      include Hopper options (descriptor loads, warp specialization)
    _prune_configs    the list for a dtype and head dim, minus tiles longer than the sequence
                      and options the call cannot use
    _BucketedAutotuner  times the pruned list once per *tuning key* and remembers the winner
    TUNED_KERNELS, only_config   hooks for GPU tests and the tuning bench

The tuning key holds length buckets, not lengths: N_Q and N_K rounded up to
a power of two (capped at 16k), plus everything else that changes the best
config: the dtypes, GQA (group > 1) and every constexpr the launcher passes
(head dim, causal, and whatever switches the kernels grow). A decode loop
whose KV cache grows by one token per step therefore times the configs once
per power of two, not once per token.

Every fp16/bf16 and fp32 entry compiles for sm_90 without register spills
(tests/test_kernel_hopper_compile.py compiles each config the autotuner may
pick with Triton's bundled ptxas); fp64 at head dim 256 spills a little.

Environment: ATTN_PIN_CONFIGS=1 makes every kernel take the first config of
its pruned list, untimed (GPU tests use it: correctness, not speed).
"""
import contextlib
import inspect
import os

import torch
import triton
from triton.runtime.autotuner import Autotuner

from .flash_bwd import _attn_bwd_dkdv, _attn_bwd_dq
from .flash_fwd import _attn_fwd
from .runtime import INTERPRET, has_tma

# Under the interpreter there is no GPU to time configs on: one fixed config,
# with blocks large enough to keep the program count (and so the run time)
# small, and BLOCK_M != BLOCK_N so the tests exercise uneven causal splits.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)
PIN_CONFIGS_ENV = "ATTN_PIN_CONFIGS"
_MAX_LENGTH_BUCKET = 16384  # longer sequences all share the 16k bucket: tiles of <= 128 never notice
_PRECISIONS = {torch.float16: "16-bit", torch.bfloat16: "16-bit", torch.float32: "fp32", torch.float64: "fp64"}


def _configs(*shapes, **options):
    """triton.Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples, each with the constexpr `options`."""
    return [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, **options}, num_warps=warps, num_stages=stages)
            for block_m, block_n, warps, stages in shapes]


# ----------------------------------------------------------------------------
# Config lists: {(precision, largest padded head dim): configs}
#
# fp16/bf16 use the tensor cores (Hopper's wgmma) and are tuned over a few
# shapes. Registers are the limit: 255 per thread, and a 128 x 128 fp32
# accumulator is 64 registers per thread at 8 warps. The forward and dQ hold a
# tall query tile (BLOCK_M = 128 needs 8 warps: at 4 warps it spills at d128);
# dK/dV hold two key tiles and two accumulators (dK, dV) and walk 16-row query
# tiles: 32 query rows or 4 warps spill at d128. The first config of a list is
# the one a pinned run (ATTN_PIN_CONFIGS=1) takes at long sequences.
#
# fp32 and fp64 multiply in true fp32/fp64 (no tensor cores), compile slowly
# (5 to 15 s a config) and are not tuned: one small tile each, chosen
# spill-free. Their matrix products run on CUDA cores, whose operand layouts
# need far more registers than wgmma: a 64x32 fp32 forward tile spills 31 KB
# at d128. At head dim 256 the fp32 dK/dV spills a few bytes even at 16x16 (24
# to 36 B), and fp64 far more: fp64 with head dim > 128 is refused on a GPU
# (kernels/flash_attention.py), so its d256 entries serve only the interpreter.
#
# Hopper options of the forward, last in their lists (a pinned run keeps the
# pointer path): USE_TMA loads Q, K and V with TMA copies from tensor
# descriptors (fewer registers: no address tiles), and WARP_SPECIALIZE, with
# TMA, splits the key loop into a producer warp group that issues the copies
# and two consumer warp groups of 64 query rows each (Triton's Hopper pass
# wants num_warps = 4 for that: it adds the consumer groups itself). The
# tuner offers TMA only where the launcher says the inputs allow it, and warp
# specialization only to non-causal calls without a window or packed
# sequences (see _BucketedAutotuner.prune_configs).
# ----------------------------------------------------------------------------
_TMA = dict(USE_TMA=True)
_TMA_WS = dict(USE_TMA=True, WARP_SPECIALIZE=True)
_FWD_CONFIGS = {
    # 128 x 128 pointer-path tiles spill a few bytes at d80 and d128 since the kernels carry the variants'
    # switches; their TMA versions (no address tiles) do not.
    ("16-bit", 128): _configs((128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (64, 64, 4, 3), (64, 32, 4, 2))
    + _configs((128, 64, 8, 3), (128, 128, 8, 2), **_TMA) + _configs((128, 64, 4, 3), (128, 128, 4, 2), **_TMA_WS),
    ("16-bit", 256): _configs((128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2)) + _configs((128, 64, 8, 2), **_TMA),
    ("fp32", 128): _configs((16, 16, 4, 2)),
    ("fp32", 256): _configs((16, 16, 4, 2)),
    ("fp64", 128): _configs((16, 16, 4, 2)),
    ("fp64", 256): _configs((16, 16, 4, 2)),
}
_DKDV_CONFIGS = {
    # 16 x 128 at 8 warps uses 254-255 registers; 3 stages, or 64 keys, spill. 16 x 32 at 4 warps is
    # the spill-free fallback (mma, not wgmma: 32 key rows are too few for a warp group; at 8 warps
    # it spills 8 B at d80).
    ("16-bit", 128): _configs((16, 128, 8, 2), (16, 32, 4, 2)),
    # At d256 every dK/dV tile wide enough for wgmma (64 keys) spills: 16x64 by 84 B (264 B on Triton
    # 3.9). 32 keys use the older mma instruction, without spills.
    ("16-bit", 256): _configs((16, 32, 8, 2), (16, 32, 8, 3)),
    ("fp32", 128): _configs((16, 64, 8, 2)),
    ("fp32", 256): _configs((16, 32, 8, 2)),
    ("fp64", 128): _configs((16, 16, 8, 1)),
    ("fp64", 256): _configs((16, 16, 8, 1)),
}
_DQ_CONFIGS = {
    ("16-bit", 128): _configs((128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)),
    ("16-bit", 256): _configs((128, 32, 8, 2), (64, 32, 8, 2)),
    ("fp32", 128): _configs((32, 64, 8, 2)),
    ("fp32", 256): _configs((16, 32, 8, 2)),
    ("fp64", 128): _configs((16, 32, 8, 2)),
    ("fp64", 256): _configs((16, 16, 8, 1)),
}


def _length_bucket(n):
    """n rounded up to a power of two, capped: lengths in one bucket share a tuned config."""
    return None if n is None else min(1 << (max(int(n), 1) - 1).bit_length(), _MAX_LENGTH_BUCKET)


def _offered(config, tma, warp_specialize):
    """Whether a call that allows descriptor loads (`tma`) and warp specialization may use `config`."""
    return ((tma or not config.kwargs.get("USE_TMA", False))
            and (warp_specialize or not config.kwargs.get("WARP_SPECIALIZE", False)))


def _prune_configs(table, dtype, head_dim, n_q, n_k, tma=False, warp_specialize=False):
    """The configs worth timing for this dtype, (padded) head dim and sequence lengths.

    The dtype and head dim pick a list, less the configs with Hopper options
    the call cannot use: descriptor loads unless `tma`, warp specialization
    unless `warp_specialize`. Then a tile longer than its sequence
    only computes padding: BLOCK_M is pruned against N_Q (a single query row
    keeps the shortest query tiles) and BLOCK_N against N_K, each at its
    length bucket, so every length in a bucket sees the same list. A length of
    None (a kernel without that argument) prunes nothing.
    """
    if dtype not in _PRECISIONS:
        raise TypeError(f"no GPU launch configs for dtype {dtype}")
    configs = [config for config in table[(_PRECISIONS[dtype], 128 if head_dim <= 128 else 256)]
               if _offered(config, tma, warp_specialize)]
    shortest_m = min(config.kwargs["BLOCK_M"] for config in configs)
    shortest_n = min(config.kwargs["BLOCK_N"] for config in configs)
    rows, cols = _length_bucket(n_q), _length_bucket(n_k)
    kept = [config for config in configs
            if (rows is None or config.kwargs["BLOCK_M"] <= max(rows, shortest_m))
            and (cols is None or config.kwargs["BLOCK_N"] <= max(cols, shortest_n))]
    return kept or [min(configs, key=lambda config: config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"])]


# ----------------------------------------------------------------------------
# The autotuner: triton's, with a bucketed tuning key
# ----------------------------------------------------------------------------
class _BucketedAutotuner(Autotuner):
    """triton.autotune with a bucketed tuning key; used as `kernel[grid](*args, **kwargs)`.

    `run` replaces triton's (whose key holds exact argument values); it reuses
    triton's `prune_configs` hook (overridden here) and `_bench`, which are
    the same from Triton 3.6 to 3.9. Triton's on-disk autotune cache is not
    used. Arguments are read by name, and every constexpr joins the key, so
    new kernel arguments need no change here.
    """

    def __init__(self, kernel, table, configs=None):
        """Tune `kernel` over `table` (the GPU lists above), or run `configs` when given (the interpreter's)."""
        all_configs = list(dict.fromkeys(config for shortlist in table.values() for config in shortlist))
        super().__init__(kernel, kernel.arg_names, configs or all_configs, key=[], reset_to_zero=None,
                         restore_value=None)
        self.table = table
        # Constexprs, from the Python signature (JIT and interpreted kernels alike);
        # the tuned ones (BLOCK_M, BLOCK_N, the forward's USE_TMA and WARP_SPECIALIZE) are chosen, not keyed.
        tuned = {name for config in all_configs for name in config.kwargs}
        self.key_constexprs = [name for name, param in inspect.signature(self.base_fn).parameters.items()
                               if "constexpr" in str(param.annotation) and name not in tuned]

    def tuning_key(self, args):
        """Length buckets, GQA or not, tensor dtypes and every constexpr: what changes the best config."""
        return (_length_bucket(args.get("N_Q")), _length_bucket(args.get("N_K")), args.get("GROUP_SIZE", 1) > 1,
                tuple(value.dtype for value in args.values() if isinstance(value, torch.Tensor)),
                tuple(args.get(name) for name in self.key_constexprs))

    def prune_configs(self, kwargs, descriptors=False):
        """The configs to time for the call in self.nargs + kwargs: `_prune_configs`, or the only one.

        Descriptor-load configs are offered when the launcher says the inputs
        allow them (`descriptors`) and the GPU has TMA; warp specialization to
        the calls Triton's Hopper pass is made for, the plain non-causal key
        loop: not to causal or windowed calls (their masked diagonal blocks),
        nor to packed sequences (with their early exit, the pass fails to compile
        the kernel in Triton 3.6).
        """
        if len(self.configs) == 1:  # the interpreter's config, or one forced by only_config
            return list(self.configs)
        args = {**self.nargs, **kwargs}
        q = args.get("Q", next((v for v in args.values() if isinstance(v, torch.Tensor)), None))
        head_dim = args.get("HEAD_DIM_PAD", args.get("HEAD_DIM"))
        tma = descriptors and has_tma(q.device)
        warp_specialize = not (args.get("IS_CAUSAL") or args.get("HAS_WINDOW") or args.get("IS_VARLEN"))
        configs = _prune_configs(self.table, q.dtype, head_dim, args.get("N_Q"), args.get("N_K"), tma,
                                 warp_specialize)
        return configs[:1] if os.environ.get(PIN_CONFIGS_ENV) == "1" else configs

    def run(self, *args, descriptors=False, **kwargs):
        """Launch with the bucket's config, timing the pruned list first on a new bucket.

        descriptors (from the forward's launcher): whether Q, K and V may be
        read through tensor descriptors. It joins the tuning key, so a strided
        view never reuses a descriptor config tuned on contiguous inputs.
        """
        self.nargs = dict(zip(self.arg_names, args))
        key = (*self.tuning_key({**self.nargs, **kwargs}), descriptors)
        config = self.cache.get(key)
        if config is None:  # a new bucket: time the pruned configs once (untimed if only one is left)
            configs = self.prune_configs(kwargs, descriptors)
            if len(configs) > 1:
                self.configs_timings = {c: self._bench(*args, config=c, **kwargs) for c in configs}
                config = min(self.configs_timings, key=self.configs_timings.get)
            else:
                config = configs[0]
                _check_hopper_options(config, kwargs, descriptors)  # a forced config is not pruned
            self.cache[key] = config
        self.best_config = config
        self.nargs = None
        return self.fn.run(*args, **kwargs, **config.all_kwargs())


def _check_hopper_options(config, kwargs, descriptors):
    """Refuse, with the reason, a config (one forced by only_config) whose Hopper options cannot run this call."""
    if config.kwargs.get("USE_TMA", False) and not descriptors:
        raise ValueError(f"config {{{config}}} loads through tensor descriptors, which need q, k and v with a unit "
                         "last stride and a 16-byte aligned start and other strides; these inputs are not")
    if config.kwargs.get("WARP_SPECIALIZE", False) and kwargs.get("IS_VARLEN", False):
        raise ValueError(f"config {{{config}}} is warp-specialized, which Triton 3.6 cannot compile for packed "
                         "sequences")


_ONE_CONFIG = [_INTERPRETER_CONFIG] if INTERPRET else None
_attn_fwd_tuned = _BucketedAutotuner(_attn_fwd, _FWD_CONFIGS, _ONE_CONFIG)
_attn_bwd_dkdv_tuned = _BucketedAutotuner(_attn_bwd_dkdv, _DKDV_CONFIGS, _ONE_CONFIG)
_attn_bwd_dq_tuned = _BucketedAutotuner(_attn_bwd_dq, _DQ_CONFIGS, _ONE_CONFIG)
_PREPROCESS_BLOCK_M = 64

# For the tuning bench (bench/tune.py) and the sm_90 compile test: every tuned kernel by name.
TUNED_KERNELS = {"fwd": _attn_fwd_tuned, "bwd_dkdv": _attn_bwd_dkdv_tuned, "bwd_dq": _attn_bwd_dq_tuned}


@contextlib.contextmanager
def only_config(name, config):
    """Within the block, tuned kernel `name` (a TUNED_KERNELS key) launches `config` for every shape, untimed.

    Its tuning cache is cleared on entry and exit, so choices made inside do
    not leak out. The config is not pruned: one that cannot fit the shape
    fails at launch (triton's OutOfResources), which the caller reports.
    """
    if name not in TUNED_KERNELS:
        raise ValueError(f"name must be one of {sorted(TUNED_KERNELS)}, got {name!r}")
    if not isinstance(config, triton.Config):
        raise TypeError(f"config must be a triton.Config, got {type(config).__name__}")
    tuner = TUNED_KERNELS[name]
    saved = tuner.configs
    tuner.configs = [config]
    tuner.cache.clear()
    try:
        yield tuner
    finally:
        tuner.configs = saved
        tuner.cache.clear()
