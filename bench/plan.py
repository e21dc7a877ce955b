"""What one run measures: the cases, the presets per device, the list of jobs.

A job is one (suite, kind, provider, mode, case). kind is "time" (timed,
with memory on the GPU) or "check" (correctness only: max error against a
float64 reference, no time). The built-in suites, planned here:

    attention  TFLOP/s over N, head dim, causal on/off, MHA and GQA; fwd, bwd
    memory     extra memory over N at batch 1 (GPU only): naive's N^2 next to O(N)
    softmax    rows of length N: torch.softmax, the naive reference, Triton
    modules    the seed's MultiHeadAttentionWrapper vs EfficientMHA, and the
               Triton-backed modules.MultiHeadAttention
    overhead   the host cost of one call at a tiny shape, as a ratio to a bare custom op: flash_attention
               forward and forward + backward, decode_attention contiguous and paged (bench/overhead.py)

The other suites (serving, decode, window, varlen, hf) plan their own jobs in
their own modules and register there (bench/registry.py); bench/suites.py
lists them all.

Order of a run: attention correctness rows, timed attention (Triton and the
SDPA backends), the host cost of one call, FlexAttention (slow to compile), the
registered suites that run early (serving, decoding), then memory, softmax and
modules, then the other registered suites: under a time budget, what matters
most runs first.

On the CPU, Triton runs under its interpreter, which is about a thousand times
slower than a GPU: its rows are correctness checks at one tiny size, never timed.
"""
import copy
from dataclasses import dataclass, field

import torch

from . import providers

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SUITES = ("attention", "memory", "softmax", "modules", "overhead")  # built in: planned here
MODES = ("fwd", "bwd", "fwd+bwd")


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class AttentionCase:
    batch: int
    heads_q: int
    heads_kv: int
    n: int
    head_dim: int
    causal: bool
    dtype: torch.dtype

    @property
    def heads(self):
        """'16' for MHA, '32:8' for GQA: the --heads spelling."""
        return str(self.heads_q) if self.heads_q == self.heads_kv else f"{self.heads_q}:{self.heads_kv}"

    @property
    def shape(self):
        return f"B{self.batch} H{self.heads} N{self.n} D{self.head_dim}" + (" causal" if self.causal else "")

    def columns(self):
        return dict(dtype=dtype_name(self.dtype), batch=self.batch, heads_q=self.heads_q, heads_kv=self.heads_kv,
                    n=self.n, head_dim=self.head_dim, causal=self.causal)


@dataclass(frozen=True)
class SoftmaxCase:
    rows: int
    n: int
    dtype: torch.dtype

    @property
    def shape(self):
        return f"{self.rows}x{self.n}"

    def columns(self):
        return dict(dtype=dtype_name(self.dtype), rows=self.rows, n=self.n)


@dataclass(frozen=True)
class ModuleCase:
    batch: int
    n: int
    d_model: int
    heads: int
    dtype: torch.dtype

    @property
    def shape(self):
        return f"B{self.batch} N{self.n} d{self.d_model} H{self.heads} causal"

    def columns(self):
        return dict(dtype=dtype_name(self.dtype), batch=self.batch, n=self.n, d_model=self.d_model,
                    heads_q=self.heads, heads_kv=self.heads, head_dim=self.d_model // self.heads, causal=True)


@dataclass(frozen=True)
class OverheadCase:
    """A tiny call's shape. For the decode modes, n is the cached keys of each sequence (one new token)."""
    batch: int
    heads: int
    n: int
    head_dim: int
    dtype: torch.dtype
    kv_heads: int | None = None  # None: as many as the query heads

    @property
    def heads_kv(self):
        return self.kv_heads or self.heads

    @property
    def shape(self):
        heads = self.heads if self.heads_kv == self.heads else f"{self.heads}:{self.heads_kv}"
        return f"B{self.batch} H{heads} N{self.n} D{self.head_dim}"

    def columns(self):
        return dict(dtype=dtype_name(self.dtype), batch=self.batch, heads_q=self.heads, heads_kv=self.heads_kv,
                    n=self.n, head_dim=self.head_dim, causal=False)


@dataclass(frozen=True)
class Job:
    suite: str
    kind: str  # "time" or "check"
    provider: str
    mode: str
    case: object


@dataclass
class Preset:
    """Sizes for one device; every field can be overridden from the command line."""

    dtype: str
    n: list
    head_dim: list
    heads: list
    tokens: int  # batch * N, kept constant so every N does comparable work per token
    modes: list
    providers: list
    memory_n: list = field(default_factory=list)
    memory_providers: list = field(default_factory=list)
    softmax_rows: int = 256
    softmax_n: list = field(default_factory=list)
    module: tuple = (8, 256, 1024, 16)  # (batch, N, d_model, heads)
    module_modes: list = field(default_factory=lambda: ["fwd", "fwd+bwd"])
    check_n: int | None = None  # None: the smallest N of the sweep
    check_shrink_heads: bool = False  # the interpreter's cost grows with heads: check with fewer
    overhead: tuple = (1, 2, 128, 64)  # (batch, heads, N, head dim): tiny, so launching dominates
    decode_overhead: tuple = (4, 8, 256, 64, 2)  # (batch, query heads, cached keys, head dim, kv heads)


KIB = 1024
PRESETS = {
    # About two minutes on a 2-core CPU; sdpa-flash's CPU kernel next to the math path and naive.
    ("cpu", False): Preset(dtype="float32", n=[256, 512, 1024, 2048], head_dim=[64], heads=["8", "8:2"],
                           tokens=1024, modes=["fwd", "bwd"], providers=["naive", "sdpa-math", "sdpa-flash"],
                           softmax_rows=256, softmax_n=[1024, 4096, 16384], module=(4, 256, 512, 8),
                           check_n=128, check_shrink_heads=True),
    ("cpu", True): Preset(dtype="float32", n=[128, 256], head_dim=[32], heads=["4", "4:2"], tokens=256,
                          modes=["fwd", "bwd"], providers=["naive", "sdpa-math", "sdpa-flash"],
                          softmax_rows=64, softmax_n=[256, 1024], module=(2, 64, 128, 4), check_n=64,
                          check_shrink_heads=True),
    # The standard GPU sweep: B * N = 16k tokens, 16 heads (GQA: 32 query heads over 8 kv heads).
    # Head dim 128 first: a run cut short by --time-budget loses the end of the list.
    ("cuda", False): Preset(dtype="bfloat16", n=[1 * KIB, 2 * KIB, 4 * KIB, 8 * KIB, 16 * KIB], head_dim=[128, 64],
                            heads=["16", "32:8"], tokens=16 * KIB, modes=["fwd", "bwd"],
                            providers=["sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex", "triton", "flash_attn"],
                            memory_n=[1 * KIB, 2 * KIB, 4 * KIB, 8 * KIB, 16 * KIB],
                            memory_providers=["naive", "sdpa-math", "sdpa-flash", "triton"],
                            softmax_rows=4 * KIB, softmax_n=[1 * KIB, 4 * KIB, 16 * KIB, 32 * KIB],
                            module=(8, 1 * KIB, 1 * KIB, 16)),
    ("cuda", True): Preset(dtype="bfloat16", n=[1 * KIB, 4 * KIB], head_dim=[64], heads=["16"], tokens=16 * KIB,
                           modes=["fwd", "bwd"], providers=["sdpa-flash", "sdpa-cudnn", "flex", "triton", "flash_attn"],
                           memory_n=[1 * KIB, 4 * KIB], memory_providers=["naive", "sdpa-flash", "triton"],
                           softmax_rows=4 * KIB, softmax_n=[1 * KIB, 8 * KIB], module=(8, 1 * KIB, 1 * KIB, 16)),
}


def parse_heads(spec):
    """'16' -> (16, 16); '32:8' -> (32, 8): query heads, kv heads."""
    try:
        parts = [int(p) for p in str(spec).split(":")]
    except ValueError:
        raise ValueError(f"heads must be HQ or HQ:HKV, got {spec!r}") from None
    h_q, h_kv = (parts[0], parts[0]) if len(parts) == 1 else parts
    if len(parts) > 2 or h_q < 1 or h_kv < 1 or h_q % h_kv:
        raise ValueError(f"heads must be HQ or HQ:HKV with HKV dividing HQ, got {spec!r}")
    return h_q, h_kv


def add_sweep_options(parser):
    """The options that choose sizes; unset ones come from the device's preset."""
    g = parser.add_argument_group("sweep (defaults: the preset for the device, see bench/plan.py)")
    g.add_argument("--dtype", choices=sorted(DTYPES))
    g.add_argument("--n", type=int, nargs="+", metavar="N", help="sequence lengths (Nq = Nk)")
    g.add_argument("--head-dim", type=int, nargs="+", metavar="D")
    g.add_argument("--heads", nargs="+", metavar="HQ[:HKV]", help="e.g. 16 (MHA) 32:8 (GQA)")
    g.add_argument("--tokens", type=int, metavar="B*N", help="batch = tokens // N (at least 1)")
    g.add_argument("--causal", choices=("both", "on", "off"), default="both")
    g.add_argument("--modes", nargs="+", choices=MODES)
    g.add_argument("--providers", nargs="+", metavar="NAME",
                   help=f"attention providers to time, from {', '.join(providers.ATTENTION)}")
    g.add_argument("--memory-n", type=int, nargs="+", metavar="N", help="sequence lengths of the memory sweep")
    g.add_argument("--softmax-n", type=int, nargs="+", metavar="N", help="row lengths of the softmax suite")
    return parser


def resolve(args, device_type):
    """The preset for the device, with the command line's choices on top."""
    preset = copy.deepcopy(PRESETS[(device_type, bool(args.quick))])
    for name in ("dtype", "n", "head_dim", "heads", "tokens", "modes", "providers", "memory_n", "softmax_n"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(preset, name, value)
    return preset


def _causal_flags(choice):
    return {"both": [False, True], "on": [True], "off": [False]}[choice]


def attention_cases(preset, causal_choice):
    """Grouped by (head dim, heads, causal), N ascending: the order of the tables, the plots and the run."""
    dtype = DTYPES[preset.dtype]
    cases = []
    for head_dim in preset.head_dim:
        for heads in preset.heads:
            h_q, h_kv = parse_heads(heads)
            for causal in _causal_flags(causal_choice):
                for n in sorted(preset.n):
                    cases.append(AttentionCase(max(1, preset.tokens // n), h_q, h_kv, n, head_dim, causal, dtype))
    return cases


def _check_case(case, check_n, shrink_heads):
    """The case at batch 1 and length check_n; under the interpreter also with 2 heads (or 1 kv head for GQA)."""
    h_q, h_kv = case.heads_q, case.heads_kv
    if shrink_heads:
        group = h_q // h_kv
        h_q, h_kv = (2, 2) if group == 1 else (group, 1)
    return AttentionCase(1, h_q, h_kv, check_n, case.head_dim, case.causal, case.dtype)


def build_jobs(args, device_type, after_attention=()):
    """The built-in suites' jobs in the order they run (see the module docstring), with `after_attention`,
    the early registered suites' jobs, between FlexAttention and memory."""
    preset = resolve(args, device_type)
    suites = SUITES if "all" in args.suite else tuple(args.suite)
    dtype = DTYPES[preset.dtype]
    available = providers.attention_names(device_type)
    timed = [p for p in preset.providers if p in available]
    if device_type == "cpu":
        timed = [p for p in timed if p != "triton"]  # the interpreter is never timed
    if device_type == "cpu":
        checked = timed + (["triton"] if "triton" in available else [])
    else:  # ours, and the error of PyTorch's own fused kernel in the same dtype to read it against
        checked = [p for p in ("sdpa-flash", "triton") if p in timed]
    attention, flex, overhead, memory, softmax, modules = [], [], [], [], [], []

    if "attention" in suites:
        cases = attention_cases(preset, args.causal)
        check_n = preset.check_n or min(preset.n)
        seen = set()
        for case in cases:
            check = _check_case(case, check_n, preset.check_shrink_heads)
            if check in seen:
                continue
            seen.add(check)
            check_modes = ["fwd", "bwd"] if any(m != "fwd" for m in preset.modes) else ["fwd"]
            attention += [Job("attention", "check", p, mode, check) for p in checked for mode in check_modes]
        for case in cases:
            for p in timed:
                # FlexAttention compiles for tens of seconds per variant: it runs after the rest.
                (flex if p == "flex" else attention).extend(
                    Job("attention", "time", p, mode, case) for mode in preset.modes)

    if "overhead" in suites:
        ours = "triton" if device_type == "cuda" else "triton-noop"
        flash = OverheadCase(*preset.overhead, dtype)
        batch, heads, n, head_dim, kv_heads = preset.decode_overhead
        decode = OverheadCase(batch, heads, n, head_dim, dtype, kv_heads)
        for mode in ("fwd", "fwd+bwd", "decode", "decode-paged"):
            case = decode if mode.startswith("decode") else flash
            overhead += [Job("overhead", "time", p, mode, case)
                         for p in ((ours,) if mode == "decode-paged" else (ours, "sdpa"))]  # SDPA has no pages

    if "memory" in suites and device_type == "cuda":
        memory_providers = [p for p in preset.memory_providers if p in available]
        for n in sorted(preset.memory_n):
            case = AttentionCase(1, 16, 16, n, 64, False, dtype)
            memory += [Job("memory", "time", p, "fwd", case) for p in memory_providers]

    if "softmax" in suites:
        softmax_timed = ["torch", "naive"] + (["triton"] if device_type == "cuda" else [])
        check = SoftmaxCase(16, 1000, dtype)  # a row that is not a power of two: the masked tail
        softmax += [Job("softmax", "check", "triton", "fwd", check)]
        softmax += [Job("softmax", "time", p, "fwd", SoftmaxCase(preset.softmax_rows, n, dtype))
                    for n in sorted(preset.softmax_n) for p in softmax_timed]

    if "modules" in suites:
        batch, n, d_model, heads = preset.module
        module_timed = ["wrapper", "efficient-mha"] + (["mha-triton"] if device_type == "cuda" else [])
        check_n = n if device_type == "cuda" else 16
        check = ModuleCase(1, check_n, d_model if device_type == "cuda" else 64, heads if device_type == "cuda" else 4,
                           dtype)
        modules += [Job("modules", "check", "mha-triton", "fwd", check)]
        case = ModuleCase(batch, n, d_model, heads, dtype)
        modules += [Job("modules", "time", p, mode, case) for mode in preset.module_modes for p in module_timed]

    return attention + overhead + flex + list(after_attention) + memory + softmax + modules, preset
