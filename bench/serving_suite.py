"""The serving suite: one step of a serving engine over a paged KV cache (`python -m bench --suite serving`).

A serving engine runs one batch per step. Some of its sequences bring one
new token (decode), others a chunk of their prompt over the part already
cached (chunked prefill). kernels.paged_attention takes the whole step in
one call (kernels/paged.py); this suite measures what that is worth. The
new tokens' keys and values are already in the cache (append_kv runs before
attention and is not timed). The layer is Llama-3-8B-like: 32 query heads
over 8 kv heads, head dim 128, bf16, over a pool of 16-token pages in vLLM's
layout (num_pages, 16, Hkv, D), handed out in a shuffled order. Three steps:

    mixed    8 decodes at 4k, 8k, ..., 32k cached keys and 2 chunks of 512 new tokens over 2k-token prefixes
    decode   B sequences of N keys, one new token each: B = 8 at N = 4k, 16k and 32k, B = 1 at 32k, B = 64 at 4k
    prefill  chunks over cached prefixes (2 x 512 over 2k, 4 x 512 over 8k) and one whole 4k prompt

Side by side, every provider on the same keys and values:

    triton-paged     kernels.paged_attention: the whole step in one call, packed new tokens, the pool as it is
    triton-separate  (mixed) the same kernel in two calls, the decodes (decode_attention) and then the
                     chunks: what the one call must beat
    sdpa             F.scaled_dot_product_attention on a contiguous copy of each sequence's keys (made once,
                     not timed: SDPA cannot read a page table). The decodes are one batch padded to the
                     longest with a key mask, as over a static cache; each chunk is its own call, causal
                     aligned bottom-right (torch.nn.attention.bias.causal_lower_right)
    flex-paged       FlexAttention on the pool itself through torch's PagedAttention
                     (torch.nn.attention.experimental._paged_attention: its page table and the conversion
                     of a logical block mask to physical pages), compiled, key tiles of one page. It takes
                     one query length per call, so the mixed step is two calls. A torch without it gets
                     an "unsupported" row that says so
    copy             (decode) a device-to-device copy of the pool's K and V, the very bytes the step reads:
                     the GPU's copy bandwidth, measured in the same run

    GB/s     (decode, mixed) bytes of K and V the step must read, each sequence's own keys once;
             copy: read and written, as in the decode suite
    TFLOP/s  (prefill, mixed) FlashAttention's 4 * D per (query, key) pair and query head, on the pairs
             the causal mask lets through (a chunk of n over a prefix of P: n * P + n (n + 1) / 2), so
             every provider is credited the same work

`summary` prints the issue's GPU targets: the mixed step against its two
separate calls (target: one call faster), decode GB/s as a share of the copy
bandwidth (target: >= 80% at B = 8 and 32k keys) and prefill TFLOP/s, with
"not measured" where the run timed nothing. Tokens per second of a whole
model's generation are the hf suite's (bench/hf_suite.py), not repeated here.

On the CPU, correctness rows only: every provider at a tiny mixed step
(fp32: decodes of 1 to 300 keys, two 20-token chunks) against
reference.paged in float64; FlexAttention runs eagerly there. GPU figures:
not measured yet.
"""
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import providers, registry
from .plan import DTYPES, KIB, Job, dtype_name
from .report import figure_title, number, provider_lines, ratio_text, text_table, timed_rows

SUITE = "serving"
BASELINE = "sdpa"
PAGE_SIZE = 16  # vLLM's default page: the most page-table lookups per key
HEADS_Q, HEADS_KV, HEAD_DIM = 32, 8, 128  # Llama-3-8B
COPY_TARGET = 0.8  # decode at B = 8, 32k keys: at least this share of the copy bandwidth (issue 17)


@dataclass(frozen=True)
class ServingCase:
    step: str  # "mixed", "decode" or "prefill"
    seqlens: tuple  # keys per sequence after this step, its new tokens included
    new: tuple  # new tokens per sequence
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: torch.dtype
    page_size: int = PAGE_SIZE

    @property
    def batch(self):
        return len(self.seqlens)

    @property
    def shape(self):
        decodes = [n for n, new in zip(self.seqlens, self.new) if new == 1]
        parts = []
        if decodes:
            keys = f"KV{min(decodes)}" + (f"-{max(decodes)}" if max(decodes) != min(decodes) else "")
            parts.append(f"B{len(decodes)} {keys}" if self.step == "decode" else f"{len(decodes)} decodes {keys}")
        for (new, prefix), count in _chunk_groups(self).items():
            parts.append(f"{count}x{new} over {prefix}" if prefix else f"{count}x{new} prompt")
        return " + ".join(parts) + f" H{self.heads_q}:{self.heads_kv} D{self.head_dim} page{self.page_size}"

    def columns(self):
        return dict(dtype=dtype_name(self.dtype), batch=self.batch, heads_q=self.heads_q, heads_kv=self.heads_kv,
                    n=max(self.seqlens), head_dim=self.head_dim, causal=True, step=self.step)

    @property
    def kv_bytes(self):
        """Bytes of K and V the step must read: each sequence's own keys and values, once."""
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.heads_kv * self.head_dim * element_size * sum(self.seqlens)

    def pairs(self):
        """Visible (query, key) pairs per query head: new token i of n over a prefix P sees P + i + 1 keys."""
        return sum(n * (length - n) + n * (n + 1) // 2 for length, n in zip(self.seqlens, self.new))

    def flops(self, mode="fwd"):
        return 4.0 * self.heads_q * self.head_dim * self.pairs()


def _chunk_groups(case):
    """{(new tokens, cached prefix): how many sequences} of the chunks (more than one new token), in batch order."""
    groups = {}
    for length, new in zip(case.seqlens, case.new):
        if new > 1:
            groups[(new, length - new)] = groups.get((new, length - new), 0) + 1
    return groups


def bytes_moved(job):
    """The bytes behind a row's GB/s: K and V read once; for `copy`, read and written."""
    return 2 * job.case.kv_bytes if job.provider == "copy" else job.case.kv_bytes


# ----------------------------------------------------------------------------
# Inputs: one step's new tokens, packed, over a shuffled pool of pages
# ----------------------------------------------------------------------------
@dataclass
class ServingInputs:
    q: torch.Tensor  # (total_q, Hq, D): sequence b's new tokens are rows cu_seqlens_q[b]:cu_seqlens_q[b + 1]
    k_pool: torch.Tensor  # vLLM's (num_pages, page_size, Hkv, D), contiguous
    v_pool: torch.Tensor
    block_table: torch.Tensor  # (B, max_pages) int32: sequence b's page j is block_table[b, j]
    seqused_k: torch.Tensor  # (B,) int32: keys per sequence, the new ones included
    cu_seqlens_q: torch.Tensor  # (B + 1,) int32
    max_seqlen_q: int
    seqlens: tuple  # the plan's keys and new tokens per sequence, on the host: nothing is read back from the GPU
    new: tuple

    @property
    def k_cache(self):
        """The kernel's (num_pages, Hkv, page_size, D): a view of the pool, no copy."""
        return self.k_pool.permute(0, 2, 1, 3)

    @property
    def v_cache(self):
        return self.v_pool.permute(0, 2, 1, 3)

    def rows(self, b):
        """The q rows of sequence b's new tokens."""
        start = sum(self.new[:b])
        return range(start, start + self.new[b])


def make_inputs(case, device, seed=0):
    """Random q and pool (never zeros: zeros hide unwritten outputs), pages handed out in a shuffled order."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=case.dtype)

    pages = [-(-n // case.page_size) for n in case.seqlens]
    order = torch.randperm(sum(pages), generator=gen, device=device).to(torch.int32)
    table = torch.zeros(case.batch, max(pages), dtype=torch.int32, device=device)  # unused entries: never read
    for b, start in enumerate(itertools.accumulate([0] + pages[:-1])):
        table[b, :pages[b]] = order[start:start + pages[b]]
    cu_seqlens = torch.tensor([0, *case.new], device=device).cumsum(0).to(torch.int32)
    return ServingInputs(
        q=rand(sum(case.new), case.heads_q, case.head_dim),
        k_pool=rand(sum(pages), case.page_size, case.heads_kv, case.head_dim),
        v_pool=rand(sum(pages), case.page_size, case.heads_kv, case.head_dim),
        block_table=table, seqused_k=torch.tensor(case.seqlens, dtype=torch.int32, device=device),
        cu_seqlens_q=cu_seqlens, max_seqlen_q=max(case.new), seqlens=case.seqlens, new=case.new)


@dataclass
class Group:
    """Sequences of a step that one call of a provider with one query length takes together."""
    seqs: list  # batch indices
    new: int  # new tokens per sequence (decodes: 1)


def decode_and_chunk_groups(inputs):
    """The decodes (one group), then the chunks grouped by their number of new tokens."""
    groups = {}
    for b, new in enumerate(inputs.new):
        groups.setdefault(new, Group([], new)).seqs.append(b)
    return sorted(groups.values(), key=lambda g: g.new)


def scatter_rows(inputs, parts):
    """Packed (total_q, Hq, D) from [(sequences, their (len(seqs) * new, Hq, D) output rows in order)]."""
    out = inputs.q.new_empty(inputs.q.shape)
    for seqs, rows in parts:
        index = [r for b in seqs for r in inputs.rows(b)]
        out[index] = rows
    return out


# ----------------------------------------------------------------------------
# Providers: prepare(inputs) -> (run, pack); run() is timed, pack(run()) gives (total_q, Hq, D)
# ----------------------------------------------------------------------------
def _triton_paged(x):
    from kernels import paged_attention

    providers._require_triton_runnable(x.q)

    def run():
        return paged_attention(x.q, x.k_cache, x.v_cache, x.seqused_k, x.block_table, cu_seqlens_q=x.cu_seqlens_q,
                               max_seqlen_q=x.max_seqlen_q)

    return run, lambda out: out


def _triton_separate(x):
    """The decodes in one call (dense, one query each), then every chunk in one packed call."""
    from kernels import decode_attention, paged_attention

    providers._require_triton_runnable(x.q)
    decodes = [b for b, new in enumerate(x.new) if new == 1]
    chunks = [b for b, new in enumerate(x.new) if new > 1]
    if not decodes or not chunks:
        raise providers.Unsupported("a step of decodes and chunks only: this one is a single kind")
    dec = torch.tensor(decodes, device=x.q.device)
    chk = torch.tensor(chunks, device=x.q.device)
    q_dec = x.q[[x.rows(b)[0] for b in decodes]].unsqueeze(2)  # (Bd, Hq, D) -> (Bd, Hq, 1, D)
    q_chk = x.q[[r for b in chunks for r in x.rows(b)]]  # (tokens, Hq, D)
    cu_chk = torch.tensor([0, *(x.new[b] for b in chunks)], device=x.q.device).cumsum(0).to(torch.int32)
    max_chk = max(x.new[b] for b in chunks)
    seq_dec, seq_chk = x.seqused_k[dec], x.seqused_k[chk]
    table_dec, table_chk = x.block_table[dec], x.block_table[chk]

    def run():
        o_dec = decode_attention(q_dec, x.k_cache, x.v_cache, seq_dec, table_dec)
        o_chk = paged_attention(q_chk, x.k_cache, x.v_cache, seq_chk, table_chk, cu_seqlens_q=cu_chk,
                                max_seqlen_q=max_chk)
        return o_dec, o_chk

    return run, lambda out: scatter_rows(x, [(decodes, out[0][:, :, 0]), (chunks, out[1])])


def contiguous_keys(x, b):
    """Sequence b's keys and values as (1, Hkv, n_b, D) copies, gathered from the pool."""
    from reference.paged import sequence_keys

    n = x.seqlens[b]
    return (sequence_keys(x.k_cache, b, 0, n, x.block_table)[None].contiguous(),
            sequence_keys(x.v_cache, b, 0, n, x.block_table)[None].contiguous())


def _sdpa(x):
    """Decodes: one batch padded to the longest, a key mask where lengths differ. Chunks: one call each."""
    from torch.nn.attention.bias import causal_lower_right

    calls = []  # (sequences, prepared call returning (len(seqs) * new, Hq, D) rows)
    for group in decode_and_chunk_groups(x):
        if group.new == 1:
            keys = [contiguous_keys(x, b) for b in group.seqs]
            longest = max(k.shape[2] for k, _ in keys)
            shape = (len(keys), x.k_cache.shape[1], longest, x.q.shape[-1])
            k, v = x.q.new_zeros(shape), x.q.new_zeros(shape)  # (Bd, Hkv, N_max, D), zeros past each end
            lengths = [kb.shape[2] for kb, _ in keys]
            for i, (kb, vb) in enumerate(keys):
                k[i, :, :lengths[i]], v[i, :, :lengths[i]] = kb[0], vb[0]
            mask = None
            if min(lengths) != longest:  # (Bd, 1, 1, N_max): each sequence's own keys
                mask = (torch.arange(longest, device=x.q.device) < torch.tensor(lengths, device=x.q.device)[:, None])
                mask = mask[:, None, None, :]
            q = x.q[[x.rows(b)[0] for b in group.seqs]].unsqueeze(2)  # (Bd, Hq, D) -> (Bd, Hq, 1, D)
            calls.append((group.seqs, lambda q=q, k=k, v=v, mask=mask: F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, enable_gqa=True)[:, :, 0]))
            continue
        for b in group.seqs:
            k, v = contiguous_keys(x, b)
            q = x.q[list(x.rows(b))].transpose(0, 1)[None]  # (n, Hq, D) -> (1, Hq, n, D)
            bias = causal_lower_right(q.shape[2], k.shape[2])
            calls.append(([b], lambda q=q, k=k, v=v, bias=bias: F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, enable_gqa=True)[0].transpose(0, 1)))  # (1, Hq, n, D) -> (n, Hq, D)

    def run():
        return [call() for _, call in calls]

    return run, lambda outs: scatter_rows(x, [(seqs, out) for (seqs, _), out in zip(calls, outs)])


def flex_paged_attention():
    """torch's PagedAttention, or Unsupported naming what this torch lacks."""
    try:
        from torch.nn.attention.experimental._paged_attention import PagedAttention
    except ImportError:
        raise providers.Unsupported(f"no torch.nn.attention.experimental._paged_attention in torch "
                                    f"{torch.__version__}") from None
    return PagedAttention


def causal_over_cache(lengths, new):
    """FlexAttention's mask_mod of `new` tokens at the end of each sequence's `lengths` keys (logical indices)."""
    offset = lengths - new  # each sequence's cached prefix: new token i sits at offset + i

    def causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + offset[b]) & (kv_idx < lengths[b])

    return causal


def _flex_paged(x):
    """FlexAttention over the pool, one call per group of equal query lengths (the mixed step: two)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    PagedAttention = flex_paged_attention()
    device = x.q.device
    # Compiled on a GPU; on the CPU (correctness rows only) flex runs eagerly, on the same block masks.
    flex = providers._compiled_flex_attention() if device.type == "cuda" else flex_attention
    num_pages, page_size = x.k_pool.shape[:2]
    # vLLM's pool (num_pages, page_size, Hkv, D) -> one long physical sequence (1, Hkv, num_pages * page_size, D)
    k_flat = x.k_pool.flatten(0, 1).transpose(0, 1)[None]
    v_flat = x.v_pool.flatten(0, 1).transpose(0, 1)[None]
    options = {"BLOCK_N": page_size}  # a key tile may not span pages: a block of the mask is one page
    calls = []
    for group in decode_and_chunk_groups(x):
        seqs = torch.tensor(group.seqs, device=device)
        lengths = x.seqused_k[seqs].to(torch.int64)  # (Bg,)
        table = x.block_table[seqs].to(torch.int64)  # (Bg, max_pages)
        pages = -(-lengths // page_size)  # pages in use per sequence
        used = torch.arange(table.shape[1], device=device) < pages[:, None]
        paged = PagedAttention(num_pages, page_size, len(group.seqs), device=device)
        # The same page table as ours (PagedAttention.reserve would hand out its own pages), and its inverse.
        paged.page_table[:, :table.shape[1]] = torch.where(used, table, -1)
        rows = torch.arange(len(group.seqs), device=device)[:, None].expand_as(table)
        paged.physical_to_logical[rows[used], table[used]] = torch.arange(table.shape[1], device=device).expand_as(
            table)[used]
        logical = create_block_mask(causal_over_cache(lengths, group.new), len(group.seqs), None, group.new,
                                    table.shape[1] * page_size, device=device, BLOCK_SIZE=(128, page_size))
        block_mask = paged.convert_logical_block_mask(logical, kv_len=lengths)
        q = x.q[[r for b in group.seqs for r in x.rows(b)]]  # (Bg * new, Hq, D)
        q = q.view(len(group.seqs), group.new, *q.shape[1:]).transpose(1, 2)  # -> (Bg, Hq, new, D)
        calls.append((group.seqs, lambda q=q, block_mask=block_mask: flex(
            q, k_flat, v_flat, block_mask=block_mask, enable_gqa=True, kernel_options=options)))

    def run():
        return [call() for _, call in calls]

    def pack(outs):  # (Bg, Hq, new, D) -> (Bg * new, Hq, D)
        return scatter_rows(x, [(seqs, out.transpose(1, 2).flatten(0, 1)) for (seqs, _), out in zip(calls, outs)])

    return run, pack


def _copy(x):
    if x.q.device.type != "cuda":
        raise providers.Unsupported("device bandwidth is measured on a GPU only")
    k_dst, v_dst = torch.empty_like(x.k_pool), torch.empty_like(x.v_pool)

    def run():
        k_dst.copy_(x.k_pool)
        v_dst.copy_(x.v_pool)

    return run, None


PROVIDERS = {
    "triton-paged": _triton_paged,
    "triton-separate": _triton_separate,
    "sdpa": _sdpa,
    "flex-paged": _flex_paged,
    "copy": _copy,
}
STEP_PROVIDERS = {
    "mixed": ("triton-paged", "triton-separate", "sdpa", "flex-paged"),
    "decode": ("copy", "triton-paged", "sdpa", "flex-paged"),
    "prefill": ("triton-paged", "sdpa", "flex-paged"),
}
CHECKED = ("triton-paged", "triton-separate", "sdpa", "flex-paged")


def build(job, device):
    """The timed callable (under no_grad) and no gradient leaves."""
    run, _ = PROVIDERS[job.provider](make_inputs(job.case, device))

    def forward():
        with torch.no_grad():
            run()

    return forward, []


def check(job, device):
    """Max abs error of the provider's packed output against reference.paged.paged_attention in float64."""
    from reference.paged import paged_attention

    x = make_inputs(job.case, device)
    run, pack = PROVIDERS[job.provider](x)
    with torch.no_grad():
        out = pack(run())
    expected = paged_attention(x.q, x.k_cache, x.v_cache, x.seqused_k, x.block_table, cu_seqlens_q=x.cu_seqlens_q,
                               dtype=torch.float64)
    diff = (out.double() - expected).abs()
    return float("inf") if torch.isnan(diff).any() else diff.max().item()


# ----------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------
def _case(step, sequences, dtype, heads=(HEADS_Q, HEADS_KV, HEAD_DIM), page_size=PAGE_SIZE):
    """sequences: (keys, new tokens) per sequence, in batch order."""
    seqlens, new = zip(*sequences)
    return ServingCase(step, tuple(seqlens), tuple(new), *heads, dtype, page_size)


def gpu_cases(dtype, quick=False):
    """(checks, timed cases) of a GPU run: the issue's mixed step first, then decode, then prefill."""
    decodes = [(4 * KIB * i, 1) for i in range(1, 9)]  # 4k, 8k, ..., 32k
    mixed = _case("mixed", decodes + [(2 * KIB + 512, 512)] * 2, dtype)
    decode = [(8, 32 * KIB)] if quick else [(8, 4 * KIB), (8, 16 * KIB), (8, 32 * KIB), (1, 32 * KIB), (64, 4 * KIB)]
    prefill = [(2, 512, 2 * KIB)] if quick else [(2, 512, 2 * KIB), (4, 512, 8 * KIB), (1, 4 * KIB, 0)]
    timed = [mixed]
    timed += [_case("decode", [(n, 1)] * batch, dtype) for batch, n in decode]
    timed += [_case("prefill", [(prefix + new, new)] * batch, dtype) for batch, new, prefix in prefill]
    # Ragged, none a multiple of a page or a tile: 3 decodes and 2 chunks of 100 over 500 keys.
    checks = [_case("mixed", [(1000, 1), (3001, 1), (77, 1), (600, 100), (600, 100)], dtype)]
    return checks, timed


# On the CPU: one tiny mixed step in fp32: decodes of 1 key (a single key), 37 (part of a page) and 300
# (many pages) keys, and two 20-token chunks over prefixes of 25 and 50 keys (more than 16 new tokens:
# the kernel's unsplit path).
CPU_CHECK = _case("mixed", [(1, 1), (37, 1), (300, 1), (45, 20), (70, 20)], torch.float32, heads=(4, 2, 32))


def build_jobs(args, device_type):
    """This suite's jobs (none unless --suite names it or all): checks first, then timings (GPU), flex last."""
    if "all" not in args.suite and SUITE not in args.suite:
        return []
    if device_type == "cpu":
        case = CPU_CHECK if args.dtype is None else _case(
            "mixed", zip(CPU_CHECK.seqlens, CPU_CHECK.new), DTYPES[args.dtype], heads=(4, 2, 32))
        return [Job(SUITE, "check", p, "fwd", case) for p in CHECKED]
    checks, timed = gpu_cases(DTYPES[args.dtype or "bfloat16"], args.quick)
    jobs = [Job(SUITE, "check", p, "fwd", case) for case in checks for p in CHECKED]
    jobs += [Job(SUITE, "time", p, "fwd", case) for case in timed for p in STEP_PROVIDERS[case.step]
             if p != "flex-paged"]
    # FlexAttention compiles for tens of seconds per block mask: after the rest, as in the attention suite.
    jobs += [Job(SUITE, "time", "flex-paged", "fwd", case) for case in timed]
    return jobs


# ----------------------------------------------------------------------------
# Rates, table, summary, plot
# ----------------------------------------------------------------------------
def _rates(job, time_ms):
    seconds = time_ms * 1e-3
    rates = {}
    if job.case.step in ("decode", "mixed"):
        rates["gbps"] = bytes_moved(job) / seconds / 1e9
    if job.case.step in ("prefill", "mixed") and job.provider != "copy":
        rates["tflops"] = job.case.flops() / seconds / 1e12
    return rates


def _columns(base):
    return [("GB/s", "gbps", number(".1f")), ("TFLOP/s", "tflops", number(".3g")),
            (f"vs {base}", "ratio", ratio_text)]


SHOWN = ("triton-paged", "triton-separate", "sdpa", "flex-paged", "copy")
COLORS = {"triton-paged": "tab:red", "triton-separate": "tab:orange", "sdpa": "tab:blue", "flex-paged": "tab:green",
          "copy": "tab:gray"}  # the same in both panels of the plot
NOT_MEASURED = "not measured"


def _cell(row, key, fmt):
    """A row's figure, its status where it has none, "not measured" where there is no row."""
    if row is None:
        return NOT_MEASURED
    value = row.get(key)
    return format(value, fmt) if isinstance(value, float) else row["status"].split(":")[0]


def _of_copy(row, copy):
    """Decode GB/s and its share of the copy's GB/s in the same run: '2400 (82%)'."""
    cell = _cell(row, "gbps", ".0f")
    if row is None or not isinstance(row.get("gbps"), float) or copy is None or not isinstance(copy.get("gbps"), float):
        return cell
    return f"{cell} ({row['gbps'] / copy['gbps']:.0%})"


def _summary_row(step, shape, got):
    """[figure, one cell per SHOWN provider, target] of one case; `got`: its timed rows by provider."""
    if step == "mixed":
        one, two = got.get("triton-paged"), got.get("triton-separate")
        timed = one and two and isinstance(one.get("time_ms"), float) and isinstance(two.get("time_ms"), float)
        speedup = f"{two['time_ms'] / one['time_ms']:.2f}x" if timed else NOT_MEASURED
        return "ms", [_cell(got.get(p), "time_ms", ".3f") for p in SHOWN], f"one call faster: {speedup}"
    if step == "decode":
        copy = got.get("copy")
        cells = [_cell(copy, "gbps", ".0f") if p == "copy" else _of_copy(got.get(p), copy) for p in SHOWN]
        target = f">= {COPY_TARGET:.0%} of copy at B8 KV32768" if shape.startswith("B8 KV32768 ") else ""
        return "GB/s (of copy)", cells, target
    return "TFLOP/s", [_cell(got.get(p), "tflops", ".1f") for p in SHOWN], ""


def summary(records):
    """Issue 17's GPU targets, one line per timed case; on a run that timed nothing, the headline cases owed."""
    rows = [r for r in records if r["suite"] == SUITE]
    if not rows:
        return ""
    timed = [r for r in rows if r["kind"] == "time"]
    if timed:
        cases = list(dict.fromkeys((r["step"], r["shape"]) for r in timed))
    else:  # a CPU run: the GPU plan's headline cases, "not measured"
        cases = [(c.step, c.shape) for c in gpu_cases(torch.bfloat16, quick=True)[1]]
    by_case = {}
    for r in timed:
        by_case.setdefault((r["step"], r["shape"]), {})[r["provider"]] = r
    table = []
    for step, shape in cases:
        figure, cells, target = _summary_row(step, shape, by_case.get((step, shape), {}))
        cells = [cell if p in STEP_PROVIDERS[step] else "" for p, cell in zip(SHOWN, cells)]
        table.append([step, shape, figure, *cells, target])
    return ("Serving steps over a paged cache (serving suite; tokens/s of generation: the hf suite)\n"
            + text_table(["step", "shape", "figure", *SHOWN, "target"], table))


NOTE = ("One serving step per row (bench/serving_suite.py): `triton-paged` runs it in one paged_attention call, "
        "`triton-separate` the mixed step's decodes and chunks in two; `sdpa` reads contiguous copies of each "
        "sequence's keys (SDPA cannot read a page table), `flex-paged` the pool through torch's PagedAttention; "
        "`copy` copies the pool's K and V (GB/s read + written). Decode GB/s counts each sequence's keys and "
        "values once; TFLOP/s counts the (query, key) pairs the causal mask lets through.")


def plot_serving(records, ctx, path):
    """Decode GB/s against keys per sequence at B = 8 (left); ms per provider of the other steps (right)."""
    import matplotlib.pyplot as plt

    rows = timed_rows(records, SUITE)
    decode = [r for r in rows if r["step"] == "decode" and r["batch"] == 8 and isinstance(r.get("gbps"), float)]
    others = [r for r in rows if r["step"] != "decode"]
    if not decode and not others:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    provider_lines(left, decode, "gbps", COLORS)
    left.set_title("decode, B = 8", fontsize=9)
    left.set_xlabel("keys per sequence")
    left.set_ylabel("GB/s of K and V read (copy: read + written)")
    if decode:
        left.legend(fontsize=7)
    shapes = list(dict.fromkeys(r["shape"] for r in others))
    names = [p for p in SHOWN if any(r["provider"] == p for r in others)]
    height = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        times = {r["shape"]: r["time_ms"] for r in others if r["provider"] == name}
        right.barh([j + i * height for j in range(len(shapes))], [times.get(s, 0.0) for s in shapes], height,
                   label=name, color=COLORS[name])
    # "8 decodes KV4096-32768 + 2x512 over 2048 H32:8 D128 page16" -> one line per part, without the heads
    labels = [s.split(" H")[0].replace(" + ", "\n+ ") for s in shapes]
    right.set_yticks([j + 0.4 - height / 2 for j in range(len(shapes))], labels, fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("ms per step (shorter is faster)")
    right.set_title("mixed step and prefill chunks", fontsize=9)
    if names:
        right.legend(fontsize=7)
    r0 = (decode or others)[0]
    fig.suptitle(figure_title(ctx, f"Serving over a paged cache: Hq {r0['heads_q']:g} over Hkv {r0['heads_kv']:g}, "
                                   f"D {r0['head_dim']:g}, {r0['dtype']}", fig, 10), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


registry.register(registry.Suite(
    SUITE, build_jobs, {ServingCase: (build, check)}, baseline=BASELINE, early=True, columns=_columns,
    rates=_rates, plots=((SUITE, plot_serving),), summary=summary, note=NOTE))
