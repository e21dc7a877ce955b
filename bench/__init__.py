"""Benchmarks for the attention playground: `python -m bench` (see bench/__main__.py).

    flops.py      the FLOP count (FlashAttention's convention)
    timing.py     do_bench on the GPU, a wall-clock median on the CPU; extra memory
    providers.py  who is measured: naive, SDPA per backend, flex, triton, flash_attn; softmax; modules
    plan.py       cases, presets per device, the job list of the built-in suites
    registry.py   where every other suite registers (its jobs, case type, baseline, table, plots, summary)
    suites.py     the one list of those suites, and the jobs of a run in order
    serving_suite.py  a serving step over a paged cache: a mixed batch, decode against copy bandwidth, prefill
    decode_suite.py   one query against a KV cache: cases, providers (copy, SDPA, flex, ours), plot
    window_suite.py, varlen_suite.py, hf_suite.py  sliding windows, packed batches, a transformers model
    sweep.py      runs the jobs; failures become statuses
    report.py     terminal table, CSV, markdown, plots
    overhead.py   the host cost of one call at a tiny shape (flash, decode), as a ratio to a bare custom op
    precompile.py warms Triton's and Inductor's caches in parallel before a GPU sweep
    tune.py       python -m bench.tune: every config of every tuned kernel, timed on the standard shapes
    gpu_check.sh  the GPU check in one command, sized for a 15-minute lease (and its `tune` run)

Nothing here imports `kernels` at import time: the entry point decides
first whether Triton must run under its interpreter.
"""
