"""The seed's demos: run each attention module once, then time the MHA wrapper against SDPA.

    python demo.py [--self_attn] [--causal_attn] [--mha] [--gqa] [--efficient_mha] [--generate] [--threads T]

With no flag every demo runs. Each demo prints the output shape of its module
on a seeded (batch 1, 6 tokens) input. --mha and --efficient_mha also time
MultiHeadAttentionWrapper (num_heads separate heads) against EfficientMHA
(fused qkv + F.scaled_dot_product_attention), on CUDA when present, else on
the CPU, in the seed's configuration and in a larger one. --generate runs
greedy generation on a small random Llama (reference/llama.py): recomputing
everything, with the reference's KV cache, and on the Triton kernels with a
KV cache (flash_attention for the prefill, decode_attention per token),
printing tokens/s for each and whether all three produced the same tokens.

On the CPU everything runs on one torch thread unless --threads says
otherwise (0: torch's own count, OMP_NUM_THREADS or one per core). One is
the fair comparison, as in the tests and `python -m bench`: the wrapper's
many tiny ops and EfficientMHA's few large ones get the same single core,
and no thread pool waits for a core that other work holds, which makes
times swing with the host's load. The timing line says the count.
"""
import argparse
import os
import time

import torch

from reference import (
    CausalAttention,
    EfficientMHA,
    GroupedQueryAttention,
    MultiHeadAttentionWrapper,
    SelfAttention,
)

SEED = 123
# The seed's configuration: one sequence of 6 tokens, 256 features, 32 heads of 8.
BATCH, NUM_TOKENS, D_IN = 1, 6, 256
D_OUT_SINGLE_HEAD = 8
D_OUT, NUM_HEADS, NUM_KV_GROUPS = 256, 32, 8
DROPOUT = 0.0
# (batch, tokens, d_out, heads): the seed's size, where the wrapper's 32 x 3 tiny matmuls are all
# overhead, then a larger one, where the arithmetic (mostly the projections) takes over.
TIMING_CONFIGS = [(1, 6, 256, 32), (8, 256, 1024, 16)]
# Each module is timed for about TIME_BUDGET_S after WARMUP calls, and at least MIN_REPEATS times:
# many repeats for the tiny seed size, a few for the large one, so the demo stays short on a CPU.
WARMUP, MIN_REPEATS, MAX_REPEATS, TIME_BUDGET_S = 3, 5, 200, 0.5


def synchronize(device):
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def mean_time_ms(module, x):
    """(mean wall time of module(x) in ms, number of timed calls), after warm-up calls.

    The warm-up pays for one-off costs (allocator, kernel selection, caches)
    and estimates the time of one call, which sets the number of repeats.
    """
    synchronize(x.device)
    start = time.perf_counter()
    for _ in range(WARMUP):
        module(x)
    synchronize(x.device)
    per_call = (time.perf_counter() - start) / WARMUP
    repeats = min(MAX_REPEATS, max(MIN_REPEATS, int(TIME_BUDGET_S / per_call)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module(x)
        synchronize(x.device)
        times.append(time.perf_counter() - start)
    return 1e3 * sum(times) / len(times), repeats


def time_wrapper_vs_efficient(device):
    """Print the forward time of the wrapper and of EfficientMHA, in every TIMING_CONFIGS size."""
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        threads = torch.get_num_threads()
        where = f"cpu ({threads} thread{'s' if threads != 1 else ''})"
    print(f"Timing on {where}: forward only, eval mode, no grad, mean after {WARMUP} warm-up calls")
    for batch, num_tokens, d_out, num_heads in TIMING_CONFIGS:
        torch.manual_seed(SEED)
        x = torch.randn(batch, num_tokens, d_out, device=device)
        wrapper = MultiHeadAttentionWrapper(d_out, d_out, num_tokens, DROPOUT, num_heads).to(device).eval()
        efficient = EfficientMHA(d_out, d_out, num_tokens, DROPOUT, num_heads).to(device).eval()
        wrapper_ms, wrapper_runs = mean_time_ms(wrapper, x)
        efficient_ms, efficient_runs = mean_time_ms(efficient, x)
        print(f"batch {batch}, {num_tokens} tokens, d_out {d_out}, {num_heads} heads:")
        print("MHA Wrapper Average time: ", f"{wrapper_ms:.3f}", " ms", f"({wrapper_runs} runs)")
        print("MHA Efficient Average time: ", f"{efficient_ms:.3f}", " ms", f"({efficient_runs} runs)")
        print(f"Wrapper time / Efficient time: {wrapper_ms / efficient_ms:.1f}x")


# --generate: a batch of prompts of different lengths, greedy, on the default LlamaConfig.
GENERATE_PROMPT_LENGTHS, GENERATE_NEW_TOKENS = (5, 12, 3), 8  # a few seconds under the interpreter


def generate_demo(device):
    """Greedy generation three ways on one random Llama; tokens/s of each, and whether they agree."""
    if device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of `kernels`
    return _generate(device)


def _generate(device):
    import modules
    from reference import Llama, LlamaConfig

    torch.manual_seed(SEED)
    config = LlamaConfig()
    naive = Llama(config).to(device).eval()
    fast = modules.Llama(config, backend="triton").to(device).eval()
    fast.load_state_dict(naive.state_dict())
    prompts = [torch.randint(0, config.vocab_size, (n,)).tolist() for n in GENERATE_PROMPT_LENGTHS]
    print(f"Generate: Llama-3-shaped, {config.num_layers} layers, d_model {config.d_model}, {config.num_heads} heads "
          f"over {config.num_kv_groups} kv heads, vocab {config.vocab_size}, random weights, fp32, on {device.type}; "
          f"{len(prompts)} prompts of {', '.join(map(str, GENERATE_PROMPT_LENGTHS))} tokens, "
          f"{GENERATE_NEW_TOKENS} new tokens each, greedy")
    runs = [("naive, no cache (recompute)", naive, False), ("reference, KV cache", naive, True),
            ("triton, KV cache", fast, True)]
    outputs = []
    for label, model, use_cache in runs:
        synchronize(device)
        start = time.perf_counter()
        tokens = model.generate(prompts, GENERATE_NEW_TOKENS, use_cache=use_cache)
        synchronize(device)
        rate = tokens.numel() / (time.perf_counter() - start)
        interpreted = label.startswith("triton") and device.type != "cuda"
        note = " (Triton interpreter on the CPU: not a speed figure)" if interpreted else ""
        print(f"{label}: {rate:.1f} tokens/s{note}")
        outputs.append(tokens)
    print("First sequence's new tokens:", outputs[-1][0].tolist())
    print("Same tokens on every backend:", all(torch.equal(t, outputs[0]) for t in outputs))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--self_attn", action="store_true", help="SelfAttention (V2)")
    parser.add_argument("--causal_attn", action="store_true", help="CausalAttention")
    parser.add_argument("--mha", action="store_true", help="MultiHeadAttentionWrapper, plus the timing")
    parser.add_argument("--gqa", action="store_true", help="GroupedQueryAttention (Llama 3)")
    parser.add_argument("--efficient_mha", action="store_true", help="EfficientMHA (SDPA), plus the timing")
    parser.add_argument("--generate", action="store_true", help="greedy generation on a small Llama, tokens/s")
    parser.add_argument("--threads", type=int, default=1, metavar="T",
                        help="torch threads on the CPU (default 1, the fair comparison; 0: torch's own count)")
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be 0 or more, got {args.threads}")
    flags = ("self_attn", "causal_attn", "mha", "gqa", "efficient_mha", "generate")
    if not any(getattr(args, flag) for flag in flags):
        for flag in flags:
            setattr(args, flag, True)

    torch.manual_seed(SEED)
    x = torch.randn(BATCH, NUM_TOKENS, D_IN)
    with torch.no_grad():
        if args.self_attn:
            out = SelfAttention(D_IN, D_OUT_SINGLE_HEAD)(x)
            print("Self attention output: ", out.shape)
        if args.causal_attn:
            out = CausalAttention(D_IN, D_OUT_SINGLE_HEAD, NUM_TOKENS, DROPOUT)(x)
            print("Causal attention output: ", out.shape)
        if args.mha:
            out = MultiHeadAttentionWrapper(D_IN, D_OUT, NUM_TOKENS, DROPOUT, NUM_HEADS)(x)
            print("MHA wrapper output: ", out.shape, "num_heads: ", NUM_HEADS)
        if args.gqa:
            out = GroupedQueryAttention(D_IN, D_OUT, NUM_HEADS, NUM_KV_GROUPS, NUM_TOKENS)(x)
            print("GQA output: ", out.shape, "num_heads: ", NUM_HEADS, "num_kv_groups: ", NUM_KV_GROUPS)
        if args.efficient_mha:
            out = EfficientMHA(D_IN, D_OUT, NUM_TOKENS, DROPOUT, NUM_HEADS)(x)
            print("Efficient MHA output: ", out.shape, "num_heads: ", NUM_HEADS)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    if args.mha or args.efficient_mha:
        time_wrapper_vs_efficient(device)
    if args.generate:
        generate_demo(device)


if __name__ == "__main__":
    main()
