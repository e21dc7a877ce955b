"""Compile the Triton kernels for a Hopper GPU (sm_90) on a machine without one.

Triton's wheel ships ptxas, so `triton.compile` with an explicit target builds
real GPU code anywhere. This catches what the interpreter cannot: code that
Triton's GPU compiler rejects, and performance properties of the generated
code. The arguments are specialised as Triton's JIT does at launch time: a
stride equal to 1 becomes a constant, and pointers and other strides are
marked divisible by 16; without that, the compiler cannot prove the loads
contiguous and does not pipeline them.

Register spills: Triton runs ptxas with -v but keeps its report only when a
compile fails, and a compile served from Triton's cache runs no ptxas at all.
So each compiled PTX goes through the bundled ptxas -v once more (under a
second for these kernels, against seconds for the compile) and its "bytes
spill stores" line is reported. A spill store parks a value the kernel has
no register for in local memory (L1, and beyond it DRAM), to be read back.

Run from the repository root, without TRITON_INTERPRET, as
`python -m tests.hopper_compile [--workers N] [job name ...]`; it prints one JSON line per job:
    {"job": ..., <the job's fields>, "async_copies": ..., "tma_loads": ..., "warp_specialized": ...,
     "wgmma": ..., "shared_bytes": ..., "registers": ..., "spill_stores": ..., "spill_loads": ...,
     "stack_frame": ..., "seconds": ...}
(bytes are per thread, except shared_bytes: per block). The jobs are every
config the autotuner may pick for the dtypes and head dims of VARIANTS, plus
two helper kernels; `--workers 2` compiles two at a time.
"""
import argparse
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET: the interpreter replaces the kernels the compiler needs")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_PTXAS_ARCH = "sm_90a"  # what Triton passes ptxas for capability 90 (wgmma needs the "a" features)
fwd = importlib.import_module("kernels.flash_fwd")
bwd = importlib.import_module("kernels.flash_bwd")
sm = importlib.import_module("kernels.softmax")
tune = importlib.import_module("kernels.configs")
dec = importlib.import_module("kernels.paged")

KERNELS = {"fwd": fwd._attn_fwd, "bwd_dkdv": bwd._attn_bwd_dkdv, "bwd_dq": bwd._attn_bwd_dq,
           "bwd_preprocess": bwd._attn_bwd_preprocess, "softmax": sm._softmax_online,
           "decode": dec._paged_attn_fwd, "decode_merge": dec._paged_merge}
TRITON_DTYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32", "fp64": "fp64"}
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
# fp32 (fp64 for fp64 inputs), whatever the input dtype: softmax statistics, the fused backward's dQ,
# decode's partial outputs.
ACCUMULATOR_POINTERS = {"LSE", "DELTA", "DQ", "O_PART", "LSE_PART"}
FP32_POINTERS = {"SINKS", "ALIBI_SLOPES"}
INT32_POINTERS = {"CU_SEQLENS_Q", "CU_SEQLENS_K", "SEQLENS", "BLOCK_TABLE"}
INT64_POINTERS = {"SEED"}
INT_ARGS = {"H_Q", "H_KV", "GROUP_SIZE", "N_Q", "N_K", "N_COLS", "NUM_ROWS", "NUM_SPLITS", "HEADS_PER_PROGRAM",
            "window_left", "window_right"}
FLOAT_ARGS = {"qk_scale", "sm_scale", "softcap", "dropout_p"}
PTXAS_USAGE = {"registers": r"Used (\d+) registers", "stack_frame": r"(\d+) bytes stack frame",
               "spill_stores": r"(\d+) bytes spill stores", "spill_loads": r"(\d+) bytes spill loads"}


def ptxas_usage(ptx):
    """Registers, stack frame and spill bytes per thread, as the bundled ptxas -v reports them."""
    ptxas = get_ptxas(HOPPER.arch).path  # the ptxas Triton itself uses for sm_90 (3.9: the newer bundled one)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas, "-v", f"--gpu-name={HOPPER_PTXAS_ARCH}", src, "-o", src + ".o"],
                             capture_output=True, text=True)
    log = run.stdout + run.stderr
    if run.returncode != 0:
        raise RuntimeError(f"{ptxas} -v failed:\n{log}")
    usage = {}
    for key, pattern in PTXAS_USAGE.items():
        match = re.search(pattern, log)
        if match is None:
            raise RuntimeError(f"ptxas -v printed no '{pattern}':\n{log}")
        usage[key] = int(match.group(1))
    return usage


def compile_for_hopper(kernel, constexprs, num_warps, num_stages, dtype="bf16"):
    """Compile `kernel` for sm_90 and describe the code: pipelining, wgmma, shared memory, registers, spills.

    A constexpr the caller does not give takes the kernel's default, so kernels
    may grow optional switches without breaking this tool.
    """
    names = kernel.arg_names
    defaults = {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}
    # Unit strides of the last (contiguous) dimension are specialised to 1, as at launch.
    # (stride_qk, stride_dok, ... for attention; stride_xc, stride_yc for softmax.)
    constexprs = dict(defaults, **constexprs, **{n: 1 for n in names if n.startswith("stride") and n[-1] in "kc"})
    accumulator = "fp64" if dtype == "fp64" else "fp32"
    signature = {}
    for param in kernel.params:
        name = param.name
        if name in constexprs:
            signature[name] = "constexpr"
        elif param.is_constexpr:
            raise ValueError(f"{kernel.__name__}: no value for constexpr {name}; pass it in constexprs")
        elif name in INT_ARGS or name.startswith("stride"):
            signature[name] = "i32"
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = (f"*{accumulator}" if name in ACCUMULATOR_POINTERS else "*fp32" if name in FP32_POINTERS
                               else "*i32" if name in INT32_POINTERS else "*i64" if name in INT64_POINTERS
                               else f"*{TRITON_DTYPES[dtype]}")
    divisible = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
                 if signature[name] != "constexpr" and (signature[name].startswith("*") or name.startswith("stride"))}
    source = ASTSource(fn=kernel, signature=signature, attrs=divisible,
                       constexprs={(names.index(k),): v for k, v in constexprs.items() if k in names})
    compiled = triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})
    ttgir = compiled.asm["ttgir"]
    # cp.async copies (ttg.async_copy_global_to_local), TMA copies (ttng.async_tma_copy_global_to_local),
    # and whether the code was split into warp-specialized partitions (a ttg.warp_specialize op).
    return {"async_copies": ttgir.count("ttg.async_copy_global_to_local"),
            "tma_loads": ttgir.count("ttng.async_tma_copy_global_to_local"),
            "warp_specialized": "ttg.warp_specialize(" in ttgir, "wgmma": ttgir.count("warp_group_dot"),
            "shared_bytes": compiled.metadata.shared, **ptxas_usage(compiled.asm["ptx"])}


def attention_constexprs(block_m, block_n, head_dim=128, causal=True, dtype="bf16", options=None):
    """The constexprs the launchers in kernels/flash_attention.py pass, on a GPU, plus a config's `options`."""
    low_precision = dtype in ("fp16", "bf16")
    return dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m,
                BLOCK_N=block_n, IS_CAUSAL=causal, UPCAST=False, DOT_PRECISION="tf32" if low_precision else "ieee",
                ACC_DTYPE=tl.float64 if dtype == "fp64" else tl.float32,
                # The plain kernel: every variant switched off (they add a few instructions per tile).
                HAS_WINDOW=False, HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_SINKS=False, HAS_DROPOUT=False,
                IS_VARLEN=False, FUSED_DQ=False, **(options or {}))


OPTION_LABELS = {"USE_TMA": "tma", "WARP_SPECIALIZE": "ws"}  # in job names

# The (dtype, head dim, causal) variants whose autotune configs the sm_90 test compiles: 49 configs,
# 7 of them the forward's descriptor-load (TMA) and warp-specialized ones.
# Left out because another variant bounds them (measured, all spill-free): head dim 64 (every tile
# is smaller than at 128), fp16 (the same code as bf16), causal d80 and non-causal d128 (the other
# of each pair is here: d80 adds the padded-column masks, causal the diagonal masks). fp32 and fp64
# at head dim 128 (spill-free too) are left out for time: an fp32 compile takes 5 to 15 s.
# fp64 at head dim 256 is refused on a GPU (check_flash_inputs), so it is not compiled here.
VARIANTS = [("bf16", 128, True), ("bf16", 80, False), ("bf16", 256, True), ("fp32", 256, True)]


def autotune_jobs(variants=VARIANTS):
    """One job per config the autotuner may pick for each (dtype, head dim, causal) in `variants`.

    Sequences are long (16k), so no config is pruned for being longer than the
    sequence, and the inputs are those of an H100 with contiguous tensors: the
    forward's descriptor-load configs are in, and its warp-specialized ones
    for the non-causal variants.
    """
    jobs = []
    for dtype, head_dim, causal in variants:
        for kernel, tuner in tune.TUNED_KERNELS.items():
            for config in tune._prune_configs(tuner.table, TORCH_DTYPES[dtype], head_dim, 16384, 16384, tma=True,
                                              warp_specialize=not causal):
                block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
                options = {name: value for name, value in config.kwargs.items() if name not in ("BLOCK_M", "BLOCK_N")}
                name = (f"{kernel} {dtype} d{head_dim} {'causal' if causal else 'full'} "
                        f"{block_m}x{block_n} w{config.num_warps} s{config.num_stages}"
                        + "".join(f" {OPTION_LABELS[option]}" for option, on in options.items() if on))
                jobs.append({"job": name, "kernel": kernel, "dtype": dtype, "head_dim": head_dim, "causal": causal,
                             "block_m": block_m, "block_n": block_n, "warps": config.num_warps,
                             "stages": config.num_stages, "options": options})
    return jobs


HELPER_JOBS = []


def run_job(job):
    """Compile one job; its row is the job's fields plus what `compile_for_hopper` found."""
    start = time.perf_counter()
    constexprs = job.get("constexprs") or attention_constexprs(job["block_m"], job["block_n"], job["head_dim"],
                                                               job["causal"], job["dtype"], job["options"])
    row = compile_for_hopper(KERNELS[job["kernel"]], constexprs, job["warps"], job["stages"], job["dtype"])
    return {**{k: v for k, v in job.items() if k != "constexprs"}, **row,
            "seconds": round(time.perf_counter() - start, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1, help="compile this many jobs at a time")
    parser.add_argument("only", nargs="*", help="job names to run (default: all)")
    args = parser.parse_args()
    jobs = [job for job in autotune_jobs() + HELPER_JOBS if not args.only or job["job"] in args.only]
    # fork: the workers inherit the imported kernels; nothing was compiled in this process yet.
    # The slowest compiles (fp32, fp64) go first, so no worker is left with one long job at the end.
    jobs.sort(key=lambda job: job["dtype"] not in ("fp32", "fp64"))
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        for row in pool.imap_unordered(run_job, jobs):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
