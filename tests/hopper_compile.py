"""Compile the Triton kernels for a Hopper GPU (sm_90) on a machine without one.

Triton's wheel ships ptxas, so `triton.compile` with an explicit target builds
real GPU code anywhere. This catches what the interpreter cannot: code that
Triton's GPU compiler rejects, and performance properties of the generated
code. The arguments are specialised as Triton's JIT does at launch time: a
stride equal to 1 becomes a constant, and pointers and other strides are
marked divisible by 16; without that, the compiler cannot prove the loads
contiguous and does not pipeline them.

Run from the repository root, without TRITON_INTERPRET, as
`python -m tests.hopper_compile [kernel name ...]`; it prints one JSON line per kernel:
    {"kernel": ..., "async_copies": ..., "wgmma": ..., "shared_bytes": ...}
"""
import importlib
import json
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET: the interpreter replaces the kernels the compiler needs")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
fwd = importlib.import_module("kernels.flash_fwd")
bwd = importlib.import_module("kernels.flash_bwd")
sm = importlib.import_module("kernels.softmax")
dec = importlib.import_module("kernels.decode")

FP32_POINTERS = {"LSE", "DELTA", "O_PART", "LSE_PART"}
INT32_POINTERS = {"SEQLENS", "BLOCK_TABLE"}
INT_ARGS = {"H_Q", "H_KV", "GROUP_SIZE", "N_Q", "N_K", "N_COLS", "NUM_ROWS", "NUM_SPLITS"}
FLOAT_ARGS = {"qk_scale", "sm_scale"}


def compile_for_hopper(kernel, constexprs, num_warps, num_stages, dtype="bf16"):
    names = kernel.arg_names
    # Unit strides of the last (contiguous) dimension are specialised to 1, as at launch.
    # (stride_qk, stride_dok, ... for attention; stride_xc, stride_yc for softmax.)
    constexprs = dict(constexprs, **{n: 1 for n in names if n.startswith("stride") and n[-1] in "kc"})
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in INT_ARGS or name.startswith("stride"):
            signature[name] = "i32"
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = ("*fp32" if name in FP32_POINTERS else "*i32" if name in INT32_POINTERS
                               else f"*{dtype}")
    divisible = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
                 if signature[name] != "constexpr" and (signature[name].startswith("*") or name.startswith("stride"))}
    source = ASTSource(fn=kernel, signature=signature, attrs=divisible,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})
    ttgir = compiled.asm["ttgir"]
    return {"async_copies": ttgir.count("async_copy_global_to_local"), "wgmma": ttgir.count("warp_group_dot"),
            "shared_bytes": compiled.metadata.shared}


def attention_constexprs(block_m, block_n, head_dim=128, causal=True):
    return dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m,
                BLOCK_N=block_n, IS_CAUSAL=causal, UPCAST=False, DOT_PRECISION="tf32", ACC_DTYPE=tl.float32)


def decode_constexprs(paged, head_dim=128, block_m=16):
    """The decode kernel as the launcher specialises it for bf16 (GQA 4, Nq 1 packs 16 rows)."""
    return dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim, BLOCK_M=block_m, BLOCK_N=dec._block_n(head_dim, 2),
                BLOCK_SIZE=16 if paged else 1, PAGED=paged, IS_CAUSAL=True, UPCAST=False, DOT_PRECISION="tf32")


def main():
    jobs = {
        "fwd d128 causal": (fwd._attn_fwd, attention_constexprs(128, 64), 8, 3),
        "fwd d80 full": (fwd._attn_fwd, attention_constexprs(128, 64, head_dim=80, causal=False), 4, 3),
        "fwd d256 causal": (fwd._attn_fwd, attention_constexprs(64, 32, head_dim=256), 4, 2),
        "bwd_dkdv d128 causal": (bwd._attn_bwd_dkdv, attention_constexprs(32, 128), 4, 3),
        "bwd_dq d128 causal": (bwd._attn_bwd_dq, attention_constexprs(128, 32), 4, 3),
        "bwd_preprocess d128": (bwd._attn_bwd_preprocess, dict(HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_M=64), 4, 1),
        "softmax": (sm._softmax_online, dict(BLOCK_N=4096), 8, 1),
        "decode contiguous d128": (dec._decode_split_kv, decode_constexprs(False), dec.NUM_WARPS, dec.NUM_STAGES),
        "decode paged d128": (dec._decode_split_kv, decode_constexprs(True), dec.NUM_WARPS, dec.NUM_STAGES),
        "decode merge d128": (dec._decode_merge, dict(HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_R=dec.MERGE_BLOCK_R),
                              dec.NUM_WARPS, 1),
    }
    only = sys.argv[1:]
    for name, (kernel, constexprs, warps, stages) in jobs.items():
        if only and name not in only:
            continue
        print(json.dumps({"kernel": name, **compile_for_hopper(kernel, constexprs, warps, stages)}), flush=True)


if __name__ == "__main__":
    main()
