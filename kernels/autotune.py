"""Launch configurations: the autotune lists of the attention kernels, and how they are pruned.

On a GPU each kernel is autotuned over a short, curated list of block shapes;
under the interpreter there is no GPU to time configs on, and one fixed config
is used.
"""
import torch
import triton

from .flash_bwd import _attn_bwd_dkdv, _attn_bwd_dq
from .flash_fwd import _attn_fwd
from .runtime import INTERPRET

# Under the interpreter there is no GPU to time configs on: one fixed config,
# with blocks large enough to keep the program count (and so the run time)
# small, and BLOCK_M != BLOCK_N so the tests exercise uneven causal splits.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)
_TUNING_KEY = ["N_Q", "N_K", "HEAD_DIM_PAD", "IS_CAUSAL"]


def _configs(*shapes):
    """triton.Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples."""
    return [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
            for block_m, block_n, warps, stages in shapes]


# A short, curated list per kernel keeps autotuning to seconds per shape. The
# forward walks keys with a tall Q tile; dK/dV holds a tall K/V tile and walks
# short query tiles; dQ is the forward's shape again. The last entries of each
# list are the small tiles that head dim 256 needs.
_FWD_CONFIGS = _configs((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3),
                        (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2))
_DKDV_CONFIGS = _configs((32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3),
                         (32, 64, 4, 2), (16, 64, 4, 2))
_DQ_CONFIGS = _configs((128, 32, 4, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3),
                       (64, 32, 4, 2), (32, 32, 4, 2))


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs that cannot fit or cannot pay off for this head dim and length.

    Every pipeline stage holds a K and a V tile (BLOCK_N x D) in shared memory
    next to the resident tile (BLOCK_M x D) and an fp32 accumulator in
    registers: head dim 256 only fits small tiles with at most 2 stages.
    fp32 and fp64 inputs skip the tensor cores' fast path and compile slowly
    (up to a minute a config): they get the smallest config, untuned.
    """
    args = {**named_args, **kwargs}  # named_args holds only positional args; HEAD_DIM_PAD comes as a kwarg
    head_dim, n_max = args["HEAD_DIM_PAD"], max(args["N_Q"], args["N_K"])
    if args["Q"].dtype in (torch.float32, torch.float64):
        return configs[-1:]
    kept = []
    for config in configs:
        block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        if head_dim >= 256 and (block_m * block_n > 64 * 32 or config.num_stages > 2):
            continue
        if min(block_m, block_n) > max(32, triton.next_power_of_2(n_max)):  # tiles far longer than the sequence
            continue
        kept.append(config)
    return kept or configs[-1:]


def _autotuned(kernel, gpu_configs):
    """The kernel autotuned over its GPU configs, or pinned to the interpreter config."""
    if INTERPRET:
        return triton.autotune(configs=[_INTERPRETER_CONFIG], key=_TUNING_KEY)(kernel)
    return triton.autotune(configs=gpu_configs, key=_TUNING_KEY,
                           prune_configs_by={"early_config_prune": _prune_configs})(kernel)


_attn_fwd_tuned = _autotuned(_attn_fwd, _FWD_CONFIGS)
_attn_bwd_dkdv_tuned = _autotuned(_attn_bwd_dkdv, _DKDV_CONFIGS)
_attn_bwd_dq_tuned = _autotuned(_attn_bwd_dq, _DQ_CONFIGS)
_PREPROCESS_BLOCK_M = 64
