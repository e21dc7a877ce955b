"""The hf suite: one Hugging Face transformers model on each attention implementation.

    eager            transformers' own matmul-softmax-matmul
    sdpa             torch's scaled_dot_product_attention (transformers' default; the baseline)
    flex_attention   FlexAttention under torch.compile (GPU only)
    playground       this project's kernels, through modules/hf.py

The model is Llama-shaped, built from a config with random weights (nothing
is downloaded): bf16, 8 layers of width 2048, 16 query heads over 4
key/value heads (head_dim 128), MLP 5632, vocabulary 32000. Two tasks:

    fwd        one forward pass of a batch of 1 x N = 4096 tokens, no cache
    generate   greedy generate() of 256 new tokens from 8 left-padded prompts of
               different lengths (up to 512), the prefill included

tokens/s is batch x n / time, where n is the tokens per sequence a call
produces (N for fwd, the new tokens for generate); `summary` prints it.

On the CPU, only correctness rows at a tiny config: fwd gives the max abs
error of the logits against eager in float64; generate, the max abs error
of each generated step's logits against eager in float64 run on the same
tokens, prompt by prompt (so a near-tie that flips a token does not make
the row useless).
"""
from dataclasses import dataclass

import torch

from . import providers, registry, report, sweep
from .plan import KIB, Job, dtype_name

SUITE = "hf"
BASELINE = "sdpa"
PROVIDERS = ("eager", "sdpa", "flex_attention", "playground")
CPU_PROVIDERS = ("eager", "sdpa", "playground")  # flex is compiled, on a GPU only
PAD = 0


@dataclass(frozen=True)
class ModelCase:
    task: str  # "fwd" or "generate"
    batch: int
    n: int  # tokens per sequence a call produces: the sequence (fwd) or the new tokens (generate)
    prompt: int  # the longest prompt (generate); n for fwd
    layers: int
    d_model: int
    heads_q: int
    heads_kv: int
    dtype: torch.dtype
    mlp: int
    vocab: int

    @property
    def shape(self):
        prompt = f" prompt{self.prompt}" if self.task == "generate" else ""
        return f"B{self.batch} N{self.n}{prompt} L{self.layers} d{self.d_model} H{self.heads_q}:{self.heads_kv}"

    @property
    def tokens(self):
        return self.batch * self.n

    def columns(self):
        return dict(dtype=dtype_name(self.dtype), batch=self.batch, heads_q=self.heads_q, heads_kv=self.heads_kv,
                    n=self.n, head_dim=self.d_model // self.heads_q, causal=True, d_model=self.d_model)


LLAMA = dict(layers=8, d_model=2 * KIB, heads_q=16, heads_kv=4, dtype=torch.bfloat16, mlp=5632, vocab=32000)
GPU_CASES = [ModelCase("fwd", 1, 4 * KIB, 4 * KIB, **LLAMA), ModelCase("generate", 8, 256, 512, **LLAMA)]
GPU_CHECKS = [ModelCase("fwd", 1, 512, 512, **LLAMA), ModelCase("generate", 2, 8, 64, **LLAMA)]
TINY = dict(layers=2, d_model=32, heads_q=2, heads_kv=1, dtype=torch.float32, mlp=64, vocab=96)
CPU_CHECKS = [ModelCase("fwd", 1, 16, 16, **TINY), ModelCase("generate", 2, 4, 6, **TINY)]


def build_jobs(args, device_type):
    """This suite's jobs (none unless --suite names it or all): checks first, then timings (GPU)."""
    if "all" not in args.suite and SUITE not in args.suite:
        return []
    if device_type == "cpu":
        return [Job(SUITE, "check", p, case.task, case) for case in CPU_CHECKS for p in CPU_PROVIDERS]
    checks = [Job(SUITE, "check", p, case.task, case) for case in GPU_CHECKS for p in PROVIDERS]
    return checks + [Job(SUITE, "time", p, case.task, case) for case in GPU_CASES for p in PROVIDERS]


# ----------------------------------------------------------------------------
# The model and its inputs
# ----------------------------------------------------------------------------
def build_model(case, device, implementation, dtype=None):
    """The case's Llama with seeded random weights (the same for every implementation), in eval mode."""
    try:
        import transformers
    except ImportError:
        raise providers.Unsupported("transformers is not installed (pip install -e '.[hf]')") from None
    if implementation == "playground":
        providers._require_triton_runnable(torch.empty(0, device=device))
        import modules.hf

        modules.hf.register()
    config = transformers.LlamaConfig(
        vocab_size=case.vocab, hidden_size=case.d_model, intermediate_size=case.mlp, num_hidden_layers=case.layers,
        num_attention_heads=case.heads_q, num_key_value_heads=case.heads_kv, max_position_embeddings=8 * KIB,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation(implementation)
    return model.to(dtype or case.dtype).eval()


def prompts(case, device):
    """fwd: (1, N) random ids. generate: `batch` prompts of lengths prompt, prompt - step, ... left-padded."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, case.vocab, (case.batch, case.prompt), generator=generator).to(device)
    if case.task == "fwd":
        return ids, None
    lengths = torch.linspace(case.prompt, max(1, case.prompt // 3), case.batch).long().to(device)
    mask = (torch.arange(case.prompt, device=device) >= case.prompt - lengths[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


def generate(model, ids, mask, new_tokens, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=PAD, eos_token_id=None, **kwargs)


# ----------------------------------------------------------------------------
# Build, check: the suite's handlers of its case type
# ----------------------------------------------------------------------------
def _build(job, device):
    case = job.case
    model = build_model(case, device, job.provider)
    ids, mask = prompts(case, device)

    def call():
        with torch.no_grad():
            return model(ids) if case.task == "fwd" else generate(model, ids, mask, case.n)

    return call, []


def _check(job, device):
    """Max abs error of the logits against eager in float64 (generate: on the steps, on the same tokens)."""
    case = job.case
    model = build_model(case, device, job.provider)
    reference = build_model(case, device, "eager", torch.float64)
    ids, mask = prompts(case, device)
    with torch.no_grad():
        if case.task == "fwd":
            return sweep.max_abs_error(model(ids).logits, reference(ids).logits)
        out = generate(model, ids, mask, case.n, return_dict_in_generate=True, output_logits=True)
        steps = torch.stack(out.logits, dim=1)  # n x (B, vocab) -> (B, n, vocab)
        # Each prompt alone, padding stripped: eager's float64 softmax runs in float32, where its
        # float64 mask value overflows to -inf and a padded row turns NaN.
        real = torch.cat([mask.bool(), torch.ones_like(out.sequences[:, mask.shape[1]:], dtype=torch.bool)], dim=1)
        expected = torch.stack([reference(out.sequences[b][real[b]][None, :-1]).logits[0, -case.n:]
                                for b in range(case.batch)])
        return sweep.max_abs_error(steps, expected)


def summary(records):
    """tokens/s per provider for each timed case (empty when nothing was timed, as on the CPU)."""
    timed = [r for r in records if r["suite"] == SUITE and r["kind"] == "time"]
    if not timed:
        return ""
    names = list(dict.fromkeys(r["provider"] for r in timed))
    rows = {}
    for r in timed:
        tokens_per_s = r["batch"] * r["n"] / (r["time_ms"] / 1e3) if r["time_ms"] else None
        rows.setdefault((r["mode"], r["shape"]), {})[r["provider"]] = (
            f"{tokens_per_s:.4g}" if tokens_per_s else r["status"].split(":")[0])
    return ("tokens/s of a Llama-shaped model (hf suite)\n"
            + report.text_table(["task", "shape"] + names,
                                [[mode, shape] + [cells.get(n, "") for n in names]
                                 for (mode, shape), cells in rows.items()]))


registry.register(registry.Suite(SUITE, build_jobs, {ModelCase: (_build, _check)}, baseline=BASELINE,
                                 summary=summary))
