"""Compile every launch config of every kernel for every GPU the configs know, on a machine without one.

Why: the launcher runs a config on a chip only if compiling it there was
measured to fit the chip's shared memory (kernels/configs.py). The interpreter
cannot tell; the compiler can. Triton's wheel ships ptxas, so `triton.compile`
with an explicit GPUTarget builds real GPU code anywhere, and shows what a
chip rejects (a Triton or ptxas error), what does not fit (shared memory per
block), and what spills (registers parked in local memory).

The matrix: for each arch of configs.CHIPS, each kernel of configs.KERNELS
and each candidate of each (precision, head-dim class), two compiles:
    plain     head dim = the class (128 or 256), every variant switch off, causal on; paged
              attention as a serving step: a packed batch over a paged cache of 16-key pages,
              GQA group 8 (the 576 class: MLA's decode, 128 heads over one latent kv head,
              q/k 512 + 64, v the latent's first 512 columns);
    variants  a padded head dim inside the class (80 or 192; 576 stays) and every switch the
              kernel has on: causal, window, softcap, ALiBi, sinks, dropout, varlen, fused dQ
              (dK/dV); for paged attention also left padding, split-KV and an fp8 (e4m3) cache
              with per-row scales (before sm_89, as the launcher does, bytes decoded in software).
Warp-specialized configs are compiled with the switches the launcher may give
them: never causal, windowed or packed (plain: every switch off).
16-bit compiles as bf16 (fp16 is the same code), fp32 and fp64 in true fp32/fp64,
fp8 (the forward only, on sm_89 and later) as e4m3 with a bf16 output.
Descriptor-load (USE_TMA) and warp-specialized configs only where the chip
has TMA. The helper kernels (delta, softmax, the split-KV merge, dropout mask)
once per arch. The arguments are specialised as Triton's JIT does at launch: a
stride equal to 1 becomes a constant, pointers and other strides are marked
divisible by 16 (without that the compiler cannot prove the loads contiguous
and does not pipeline them).

Register spills: Triton runs ptxas -v and, asked to (knobs.nvidia.dump_ptxas_log),
prints its report, whose "bytes spill stores" line is kept. A compile served
from Triton's cache runs no ptxas: its PTX goes through the bundled ptxas -v
once more, with the --gpu-name Triton uses (sm_90a, sm_100a, sm_120a: the "a"
features).

Run from the repository root, without TRITON_INTERPRET:
    python -m tests.gpu_compile [--arch sm_80 sm_90 ...] [--workers 2] [--write-footprints [PATH]]
                                [--jobs NAME ...]
It prints one JSON line per job:
    {"job": "sm_90 fwd 16-bit d128 M128 N64 w8 s3 plain", "arch", "triton", "variant", "kernel", "dtype",
     "head_dim", "block_m", "block_n", "warps", "stages", "options", "footprint_key",
     "async_copies", "tma_loads", "warp_specialized", "wgmma", "tcgen05_mma", "fp8_mma", "atomic_adds",
     "ordered_atomic_adds", "shared_bytes",
     "registers", "spill_stores", "spill_loads", "stack_frame", "seconds"}
(bytes per thread, except shared_bytes: per block); a job that does not
compile has "error" instead of the measurements. --write-footprints merges
the measurements into kernels/footprints.json (see `write_footprints`).

Speed: each job is compiled in a process forked from this one (kernels
already imported; a compiler crash or hang costs one row, not the run), the
slowest (fp64, fp32, head dim 256) first so no worker is left alone with a
long one at the end, and jobs that would compile exactly the same thing
share one compile. The full matrix (1186 jobs) took 33 minutes of wall time
on two cores with an empty Triton cache (Triton 3.9, 2026-12-06); its slowest
compiles, 2-3 minutes each, are MLA's decode with every switch on sm_80 and
sm_86, whose e4m3 cache is decoded in software there.
"""
import argparse
import datetime
import importlib
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET: the interpreter replaces the kernels the compiler needs")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

configs = importlib.import_module("kernels.configs")
fwd = importlib.import_module("kernels.flash_fwd")
bwd = importlib.import_module("kernels.flash_bwd")
paged = importlib.import_module("kernels.paged_fwd")
paged_launch = importlib.import_module("kernels.paged")
sm = importlib.import_module("kernels.softmax")
tiles = importlib.import_module("kernels.tiles")

KERNELS = {"fwd": fwd._attn_fwd, "bwd_dkdv": bwd._attn_bwd_dkdv, "bwd_dq": bwd._attn_bwd_dq,
           "paged": paged._paged_attn_fwd, "bwd_preprocess": bwd._attn_bwd_preprocess,
           "softmax": sm._softmax_online, "paged_merge": paged._paged_merge, "dropout_mask": tiles._dropout_mask_kernel}
# fp16 compiles to the same code as bf16; fp8 is e4m3 (e5m2 takes the same instructions)
PRECISION_DTYPES = {"16-bit": "bf16", "fp32": "fp32", "fp64": "fp64", "fp8": "fp8e4nv"}
FP8_ARCHS = ("sm_89", "sm_90", "sm_100", "sm_120")  # fp8 tensor cores; the launcher refuses fp8 below sm_89
VARIANT_HEAD_DIMS = {128: 80, 256: 192, 576: 576}  # padded inside the class: the padded-column masks compiled in
PAGE_SIZE = 16  # a paged cache's page in the compiles: small pages, the most block-table lookups per key tile
MLA_GROUP, GQA_GROUP = 128, 8  # query heads per kv head: DeepSeek-V3's MLA decode, and a Llama-style GQA
# fp32 (fp64 for fp64 inputs), whatever the input dtype: softmax statistics, the fused backward's dQ,
# split-KV's partial outputs.
ACCUMULATOR_POINTERS = {"LSE", "DELTA", "DQ", "O_PART", "LSE_PART"}
FP32_POINTERS = {"SINKS", "ALIBI_SLOPES", "DESCALE", "K_SCALE", "V_SCALE"}
INT32_POINTERS = {"CU_SEQLENS_Q", "CU_SEQLENS_K", "SEQLENS", "SEQUSED_K", "LEFTPAD", "BLOCK_TABLE", "BLOCK_MASK"}
INT64_POINTERS = {"SEED"}
INT8_POINTERS = {"MASK"}
INT_ARGS = {"H_Q", "H_KV", "GROUP_SIZE", "GROUP", "N_Q", "N_K", "N_COLS", "N_ROWS", "NUM_ROWS", "NUM_SPLITS",
            "HEADS_PER_PROGRAM", "window_left", "window_right", "row_offset", "stream_offset", "BATCH",
            "HEAD_BLOCKS", "CAPACITY", "NUM_PAGES", "TILES", "SPLIT_TILES", "search_steps"}
FLOAT_ARGS = {"qk_scale", "sm_scale", "softcap", "dropout_p"}
TUPLE_ARGS = {"score_args", "mask_args", "grad_args"}  # the mods' arguments: empty tuples without mods
PTXAS_USAGE = {"registers": r"Used (\d+) registers", "stack_frame": r"(\d+) bytes stack frame",
               "spill_stores": r"(\d+) bytes spill stores", "spill_loads": r"(\d+) bytes spill loads"}
JOB_TIMEOUT_S = 600  # a compile that has not finished by then (the slowest take ~20 s) is reported as failed


def capability(arch: str) -> int:
    major, minor = configs.CHIPS[arch].capability
    return 10 * major + minor


def ptxas_usage(kernel_name: str, ptx: str, cc: int, printed: str) -> dict:
    """Registers, stack frame and spill bytes per thread of the kernel, as ptxas -v reports them.

    `printed`: what the compile printed. Triton's own ptxas run prints its
    report there (knobs.nvidia.dump_ptxas_log, set in the compiling process);
    a compile served from Triton's cache ran no ptxas, so the PTX goes through
    the ptxas Triton uses for `cc` once more, with Triton's --gpu-name.
    """
    header = f"Function properties for {kernel_name}"
    if header not in printed:
        ptxas = get_ptxas(cc).path  # Blackwell has its own bundled ptxas
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "kernel.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            run = subprocess.run([ptxas, "-v", f"--gpu-name={sm_arch_from_capability(cc)}", src, "-o", src + ".o"],
                                 capture_output=True, text=True)
        printed = run.stdout + run.stderr
        if run.returncode != 0 or header not in printed:
            raise RuntimeError(f"{ptxas} -v failed:\n{printed}")
    report = printed[printed.index(header):]
    usage = {}
    for key, pattern in PTXAS_USAGE.items():
        match = re.search(pattern, report)
        if match is None:
            raise RuntimeError(f"ptxas -v printed no '{pattern}':\n{report}")
        usage[key] = int(match.group(1))
    return usage


def signature_and_constexprs(kernel, constexprs: dict, dtype: str, pointer_dtypes=None):
    """Triton's signature of `kernel` for a launch with `dtype` tensors, and the constexprs completed.

    pointer_dtypes: {pointer name: dtype} for tensors not in `dtype` (an fp8 forward's bf16 output,
    a bf16 query over an fp8 cache).

    A constexpr the caller does not give takes the kernel's default, so kernels
    may grow optional switches without breaking this tool. Unit strides of the
    last (contiguous) dimension are specialised to 1, as at launch
    (stride_qk, stride_dok, ... for attention; stride_xc, stride_yc for softmax).
    """
    names = kernel.arg_names
    defaults = {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}
    constexprs = dict(defaults, **constexprs, **{n: 1 for n in names if n.startswith("stride") and n[-1] in "kc"})
    accumulator = "fp64" if dtype == "fp64" else "fp32"
    if dtype.startswith("fp8"):  # fp8 inputs come with 16-bit everything else
        pointer_dtypes = {"O": "bf16", **(pointer_dtypes or {})}
    signature = {}
    for param in kernel.params:
        name = param.name
        if name in constexprs:
            signature[name] = "constexpr"
        elif param.is_constexpr:
            raise ValueError(f"{kernel.__name__}: no value for constexpr {name}")
        elif name in TUPLE_ARGS:
            signature[name] = ()  # what Triton's launch makes of an empty tuple
        elif pointer_dtypes and name in pointer_dtypes:
            signature[name] = f"*{pointer_dtypes[name]}"
        elif name in INT_ARGS or name.startswith("stride"):
            signature[name] = "i32"
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = (f"*{accumulator}" if name in ACCUMULATOR_POINTERS else "*fp32" if name in FP32_POINTERS
                               else "*i32" if name in INT32_POINTERS else "*i64" if name in INT64_POINTERS
                               else "*i8" if name in INT8_POINTERS else f"*{dtype}")
    return signature, {name: value for name, value in constexprs.items() if name in names}


def compile_kernel(kernel, constexprs: dict, num_warps: int, num_stages: int, dtype: str, cc: int,
                   printed=lambda: "", pointer_dtypes=None) -> dict:
    """Compile `kernel` for capability `cc` and describe the code: pipelining, MMA kind, shared memory, spills.

    printed: returns what the compile printed so far (see ptxas_usage).
    """
    signature, constexprs = signature_and_constexprs(kernel, constexprs, dtype, pointer_dtypes)
    names = kernel.arg_names
    divisible = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
                 if isinstance(signature[name], str) and signature[name] != "constexpr"
                 and (signature[name].startswith("*") or name.startswith("stride"))}
    source = ASTSource(fn=kernel, signature=signature, attrs=divisible,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    # cp.async copies (ttg.async_copy_global_to_local), TMA copies (ttng.async_tma_copy_global_to_local),
    # whether the code was split into warp-specialized partitions (a ttg.warp_specialize op), and the
    # matrix products: Hopper's wgmma (ttng.warp_group_dot), Blackwell's tcgen05 (ttng.tc_gen5_mma).
    return {"async_copies": ttgir.count("ttg.async_copy_global_to_local"),
            "tma_loads": ttgir.count("ttng.async_tma_copy_global_to_local"),
            "warp_specialized": "ttg.warp_specialize(" in ttgir, "wgmma": ttgir.count("ttng.warp_group_dot"),
            "tcgen05_mma": ttgir.count("ttng.tc_gen5_mma"),
            # fp8 tensor-core instructions: Ada's mma.sync ...e4m3.e4m3, Hopper's wgmma ...e4m3.e4m3,
            # Blackwell's tcgen05.mma kind::f8f6f4
            "fp8_mma": len(re.findall(r"(mma\.sync|wgmma\.mma_async)[^\n]*\.e4m3\.e4m3|kind::f8f6f4", ptx)),
            # atomic adds (the fused backward's dQ), and those with an ordering a sum does not need
            "atomic_adds": len(atomic_adds := re.findall(r"\b(?:atom|red)\.[^\n]*\.add\b[^\n]*", ptx)),
            "ordered_atomic_adds": sum(bool(re.search(r"\.(acq_rel|acquire|release)\b", line))
                                       for line in atomic_adds),
            "shared_bytes": compiled.metadata.shared, **ptxas_usage(kernel.__name__, ptx, cc, printed())}


# ----------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------
# flash_attention._flash_fwd offers warp-specialized configs only to calls without these switches.
NOT_WITH_WARP_SPECIALIZATION = ("IS_CAUSAL", "HAS_WINDOW", "IS_VARLEN")


def switches(kernel: str, variant: str, options: dict) -> dict:
    """The compile-time switches of one compile; each kernel takes the ones it has (see signature_and_constexprs).

    plain: causal, nothing else (paged attention: a packed batch over a paged cache); variants:
    everything on. A warp-specialized config is compiled only with the switches the launcher
    may combine it with.
    """
    on = variant == "variants"
    flags = dict(IS_CAUSAL=True, HAS_WINDOW=on, HAS_SOFTCAP=on, HAS_ALIBI=on, HAS_SINKS=on, HAS_DROPOUT=on,
                 IS_VARLEN=on, FUSED_DQ=on and kernel == "bwd_dkdv")
    if kernel == "paged":
        flags.update(IS_VARLEN=True, PAGED=True, PAGE_SIZE=PAGE_SIZE, HAS_LEFTPAD=on, SPLIT=on,
                     KV_SCALES=2 if on else 0)
    if options.get("WARP_SPECIALIZE"):
        flags.update(dict.fromkeys(NOT_WITH_WARP_SPECIALIZATION, False))
    return flags


def attention_constexprs(kernel: str, dtype: str, head_dim: int, variant: str, config, arch: str) -> dict:
    """The constexprs a launcher passes on a GPU for this config, dtype, head dim and variant."""
    options = {name: value for name, value in config.kwargs.items() if name not in ("BLOCK_M", "BLOCK_N")}
    head_dim_pad = tiles._head_dim_pad(head_dim)
    extra = {}
    if dtype.startswith("fp8"):  # kernels/flash_attention.py's _launch_plan: the fp8 MMA's K is 32
        head_dim_pad = max(32, head_dim_pad)
        extra = dict(HAS_DESCALE=True, ROUND_BY_HAND=False)
    head_dim_v = head_dim
    if kernel == "paged":
        mla = head_dim > 256
        head_dim_v = paged_launch.MAX_HEAD_DIM_V if mla else head_dim
        head_dim_pad, tail = paged_launch.head_dim_tiles(head_dim)
        heads, _, _ = paged_launch._tile_shape(config.kwargs["BLOCK_M"], MLA_GROUP if mla else GQA_GROUP)
        extra = dict(HEAD_DIM_TAIL=tail, HEADS=heads, SHARED_KV=mla,
                     E4M3_BYTES=pointer_dtypes(kernel, dtype, variant, arch) == {"K": "u8", "V": "u8"})
    return dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, HEAD_DIM_V=head_dim_v,
                HEAD_DIM_V_PAD=tiles._head_dim_pad(head_dim_v), **config.kwargs,
                UPCAST=False, DOT_PRECISION="tf32" if dtype == "bf16" else "ieee",
                ACC_DTYPE=tl.float64 if dtype == "fp64" else tl.float32, **extra, **switches(kernel, variant, options))


def pointer_dtypes(kernel: str, dtype: str, variant: str, arch: str):
    """Tensors not in the job's dtype: paged attention's e4m3 cache in the variants compile, as bytes where
    Triton has no e4m3 type (before sm_89: kernels/paged.py reads it so)."""
    if kernel == "paged" and variant == "variants" and dtype == "bf16":
        cache = "fp8e4nv" if arch in FP8_ARCHS else "u8"
        return {"K": cache, "V": cache}
    return None


def attention_jobs(arch: str) -> list:
    """Two jobs (plain, variants) per candidate of every kernel in configs.KERNELS that `arch` may run."""
    chip = configs.CHIPS[arch]
    jobs = []
    for kernel, kernel_configs in configs.KERNELS.items():
        for (precision, head_dim_class), candidates in kernel_configs.candidates.items():
            if precision == "fp8" and arch not in FP8_ARCHS:
                continue
            dtype = PRECISION_DTYPES[precision]
            for config in candidates:
                if config.kwargs.get("USE_TMA") and not chip.has_tma:
                    continue
                key = configs.footprint_key(kernel, precision, head_dim_class, config)
                for variant, head_dim in (("plain", head_dim_class), ("variants", VARIANT_HEAD_DIMS[head_dim_class])):
                    jobs.append({"job": f"{arch} {key} {variant}", "arch": arch, "variant": variant,
                                 "kernel": kernel, "dtype": dtype, "precision": precision, "head_dim": head_dim,
                                 "block_m": config.kwargs["BLOCK_M"], "block_n": config.kwargs["BLOCK_N"],
                                 "warps": config.num_warps, "stages": config.num_stages,
                                 "options": {k: v for k, v in config.kwargs.items() if k not in ("BLOCK_M", "BLOCK_N")},
                                 "footprint_key": key, "pointer_dtypes": pointer_dtypes(kernel, dtype, variant, arch),
                                 "constexprs": attention_constexprs(kernel, dtype, head_dim, variant, config, arch)})
    return jobs


def helper_jobs(arch: str) -> list:
    """The kernels with one fixed launch, as the launchers launch them (bf16, head dim 128; the merge also at
    MLA's 512)."""
    d128 = dict(HEAD_DIM=128, HEAD_DIM_PAD=128)
    merge = dict(IS_VARLEN=True, HAS_SINKS=False, UPCAST=False)
    helpers = [("bwd_preprocess", "bwd_preprocess", 4, dict(d128, BLOCK_M=64)),  # flash_attention's delta tile
               ("softmax", "softmax", 8, dict(BLOCK_N=4096)),  # softmax's widest step: 4096 columns, 8 warps
               ("paged_merge", "paged_merge", paged_launch.MERGE_WARPS,
                dict(d128, BLOCK_R=paged_launch.merge_block_rows(128), **merge)),
               ("paged_merge d512", "paged_merge", paged_launch.MERGE_WARPS,
                dict(HEAD_DIM=512, HEAD_DIM_PAD=512, BLOCK_R=paged_launch.merge_block_rows(512), **merge)),
               ("dropout_mask", "dropout_mask", 4, dict(BLOCK_M=32, BLOCK_N=32))]  # dropout_keep_mask's tiles
    return [{"job": f"{arch} {name}", "arch": arch, "variant": "helper", "kernel": kernel, "dtype": "bf16",
             "warps": warps, "stages": 1, "constexprs": constexprs} for name, kernel, warps, constexprs in helpers]


def all_jobs(archs) -> list:
    return [job for arch in archs for job in attention_jobs(arch) + helper_jobs(arch)]


def expected_cost(job) -> tuple:
    """Sorts the slowest compiles first: fp64, then fp32 (CUDA-core products, big unrolled tiles), then the
    256 class, then the variants (more code)."""
    precision_rank = {"fp64": 0, "fp32": 1}.get(job["dtype"], 2)
    return precision_rank, -configs.head_dim_class(job.get("head_dim", 0)), job["variant"] != "variants"


def compile_identity(job) -> str:
    """What determines the compiled code: jobs with the same identity share one compile."""
    constexprs = {name: str(value) for name, value in job["constexprs"].items()}
    return json.dumps([job["arch"], job["kernel"], job["dtype"], job["warps"], job["stages"], constexprs,
                       job.get("pointer_dtypes")], sort_keys=True)


# ----------------------------------------------------------------------------
# Running: one forked process per compile, `workers` at a time
# ----------------------------------------------------------------------------
def compile_job(job, log) -> dict:
    """The measurements of one job, or {"error": ...} when Triton or ptxas rejects it.

    `log`: the file this process's stdout and stderr go to, where the compiler prints.
    """
    def printed() -> str:
        sys.stdout.flush()
        return os.pread(log.fileno(), os.fstat(log.fileno()).st_size, 0).decode(errors="replace")

    start = time.perf_counter()
    try:
        row = compile_kernel(KERNELS[job["kernel"]], job["constexprs"], job["warps"], job["stages"], job["dtype"],
                             capability(job["arch"]), printed, job.get("pointer_dtypes"))
    except Exception as error:  # a config the chip cannot take is a result, not a crash
        said = [line.strip() for line in printed().splitlines()
                if re.search(r"error|Assertion|ptxas (fatal|error)", line) and len(line) < 500]
        row = {"error": "\n".join([f"{type(error).__name__}: {str(error)[:2000]}", *said[:8]])}
    return {**row, "seconds": round(time.perf_counter() - start, 1)}


def _compile_in_child(job, sender):
    # Triton prints a failing kernel's PTX or IR, and (asked to) its ptxas report: keep stdout for
    # the JSON lines, and what the compiler says for the row.
    triton.knobs.nvidia.dump_ptxas_log = True
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sender.send(compile_job(job, log))
    sender.close()


def run_jobs(jobs, workers: int):
    """Yield one row per job, compiling each distinct job once, the slowest first, `workers` at a time."""
    groups = {}
    for job in jobs:
        groups.setdefault(compile_identity(job), []).append(job)
    pending = sorted(groups.values(), key=lambda group: expected_cost(group[0]))
    context = multiprocessing.get_context("fork")  # the children inherit the imported kernels
    running = {}  # receiving end of a child's pipe -> (process, its jobs, start time)
    try:
        while pending or running:
            while pending and len(running) < workers:
                group = pending.pop(0)
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=_compile_in_child, args=(group[0], sender), daemon=True)
                process.start()
                sender.close()
                running[receiver] = (process, group, time.monotonic())
            for receiver in multiprocessing.connection.wait(list(running), timeout=10):
                process, group, start = running.pop(receiver)
                try:
                    result = receiver.recv()
                except EOFError:  # the child died without a word: a compiler crash
                    result = {"error": "the compiler process died", "seconds": round(time.monotonic() - start, 1)}
                process.join()
                yield from (row_of(job, result) for job in group)
            for receiver, (process, group, start) in list(running.items()):
                if time.monotonic() - start > JOB_TIMEOUT_S:
                    process.kill()
                    process.join()
                    del running[receiver]
                    result = {"error": f"compile did not finish in {JOB_TIMEOUT_S} s", "seconds": JOB_TIMEOUT_S}
                    yield from (row_of(job, result) for job in group)
    finally:  # stopped early (an exception, Ctrl-C, SIGTERM): no compile outlives the run
        for process, _, _ in running.values():
            process.kill()
            process.join()


def row_of(job, result) -> dict:
    return {**{k: v for k, v in job.items() if k != "constexprs"}, "triton": triton.__version__, **result}


# ----------------------------------------------------------------------------
# Footprints
# ----------------------------------------------------------------------------
def write_footprints(rows, path):
    """Merge measured footprints into `path`: {arch: {key: [shared bytes, plain spills, variants spills]}}.

    Shared memory is the maximum over the key's compiles (plain and variants),
    spill-store bytes per thread the maximum of each compile apart, and every
    value the maximum with the one already in the file, so runs on several
    Triton versions leave the worst case of all of them (a warp-specialized
    config has no variants compile: its plain spills stand for both). A key with a failed compile in any
    run gets no entry: it goes under "failed" ({arch: {key: [triton versions]}}; a later run of the
    same Triton version in which it compiles clears it), and the launcher never offers it there.
    Keys that are no longer candidates are dropped. Values only grow: to measure afresh (a kernel got
    leaner, a failure was fixed), delete the file and run once per supported Triton version.
    """
    data = {"measured_with": {}, "archs": {}, "failed": {}}
    if os.path.exists(path):
        with open(path) as f:
            data.update(json.load(f))
    version = triton.__version__
    measured, failed = data["archs"], data["failed"]
    for row in rows:  # this run's compiles decide this version's failures: a fixed one leaves the list
        if "footprint_key" in row and "error" not in row and version in failed.get(row["arch"], {}).get(
                row["footprint_key"], []):
            failed[row["arch"]][row["footprint_key"]].remove(version)
    for row in rows:
        if "footprint_key" not in row:
            continue
        arch, key = row["arch"], row["footprint_key"]
        if "error" in row:
            failed.setdefault(arch, {})[key] = sorted(set(failed.get(arch, {}).get(key, [])) | {version})
        else:
            old = measured.setdefault(arch, {}).get(key, [0, 0, 0])
            old = old if len(old) == 3 else [old[0], old[1], old[1]]
            plain, variants = max(old[1], row["spill_stores"]), max(old[2], row["spill_stores"])
            measured[arch][key] = [max(old[0], row["shared_bytes"]), plain if row["variant"] == "plain" else old[1],
                                   variants if row["variant"] == "variants" or row["options"].get("WARP_SPECIALIZE")
                                   else old[2]]
    candidates = {arch: {job["footprint_key"] for job in attention_jobs(arch)} for arch in configs.CHIPS}
    failed = {arch: {key: versions for key, versions in sorted(failed.get(arch, {}).items())
                     if key in candidates[arch] and versions} for arch in configs.CHIPS}
    data["archs"] = {arch: {key: value for key, value in sorted(measured.get(arch, {}).items())
                            if key in candidates[arch] and key not in failed[arch]} for arch in configs.CHIPS}
    data["failed"] = {arch: keys for arch, keys in failed.items() if keys}
    data["measured_with"] = {
        "tool": "python -m tests.gpu_compile --write-footprints",
        "triton": {**data["measured_with"].get("triton", {}), version: datetime.date.today().isoformat()},
        "values": "[shared memory bytes per block (the larger of the plain and variants compiles), spill-store "
                  "bytes per thread of the plain compile, of the variants compile]: the maximum over the "
                  "Triton versions listed",
    }
    text = json.dumps(data, indent=1)
    # One line per entry: [shared, spills] and the failed versions on the key's own line.
    text = re.sub(r"\[([^\[\]{}]*)\]", lambda lst: "[" + ", ".join(item.strip() for item in lst[1].split(",")) + "]",
                  text)
    with open(path, "w") as f:
        f.write(text + "\n")


def main():
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"stopped by signal {signum}"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", choices=list(configs.CHIPS), default=list(configs.CHIPS),
                        help="target architectures (default: every chip in kernels/configs.py)")
    parser.add_argument("--workers", type=int, default=2, help="compile this many jobs at a time")
    parser.add_argument("--write-footprints", nargs="?", const=str(configs.FOOTPRINTS_PATH), metavar="PATH",
                        help="merge the measured footprints into PATH (default kernels/footprints.json)")
    parser.add_argument("--jobs", nargs="+", metavar="NAME", help="run only these jobs (names as printed)")
    args = parser.parse_args()
    jobs = all_jobs(args.arch)
    if args.jobs:
        unknown = set(args.jobs) - {job["job"] for job in jobs}
        if unknown:
            parser.error(f"no such job for {' '.join(args.arch)}: {sorted(unknown)}")
        jobs = [job for job in jobs if job["job"] in args.jobs]
    rows = []
    for row in run_jobs(jobs, args.workers):
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.write_footprints:
        write_footprints(rows, args.write_footprints)


if __name__ == "__main__":
    main()
