"""fp8 attention (kernels/fp8.py) against float64 attention on the dequantized inputs.

The yardstick is PyTorch doing the same quantized computation (reference/fp8.py:
fp8 products summed in fp32, P rounded to fp8 for P.V, a 16-bit output): the
kernel may be at most 2x as far from float64 as it is (tests/helpers.py's rule).
"""
import math

import pytest
import torch
import triton
import triton.language as tl

import kernels
from kernels import mods
from kernels.configs import CHIP_ENV
from kernels.flash_attention import _flash_fwd
from kernels.fp8 import stack_descales
from kernels.tiles import _round_to_fp8
from reference import naive_attention, naive_attention_varlen
from reference.fp8 import FP8_DTYPES, dequantize_fp8, fp8_attention, quantize_fp8
from tests.cases import FP8_CASES, VARIANT_CASES, AttentionCase, Fp8Case
from tests.helpers import assert_close_to_reference, poisoned_like, rows_with_a_key

E4M3, E5M2 = FP8_DTYPES


@triton.jit
def _round_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    tl.store(Y + offs, _round_to_fp8(x, Y.dtype.element_ty), mask=offs < n)


def _quantized(case, device, seed=0):
    """Random q, k, v quantized: ((q8, k8, v8), {q_descale, k_descale, v_descale}, dequantized (q, k, v))."""
    torch.manual_seed(seed)
    s = case.shape
    q, k, v = s.make_inputs(torch.float32, device)
    if case.per_head:  # (B, Hkv): q's heads grouped by the kv head they share
        pairs = [quantize_fp8(t, case.fp8, group) for t, group in ((q, s.h_q // s.h_kv), (k, 1), (v, 1))]
    else:  # one element per tensor: the whole tensor as one (1, 1, rows, D) block
        pairs = [quantize_fp8(t.reshape(1, 1, -1, t.shape[-1]), case.fp8) for t in (q, k, v)]
        pairs = [(t8.reshape(t.shape), d.reshape(())) for (t8, d), t in zip(pairs, (q, k, v))]
    tensors = tuple(t8 for t8, _ in pairs)
    descales = dict(zip(("q_descale", "k_descale", "v_descale"), (d for _, d in pairs)))
    return tensors, descales, tuple(dequantize_fp8(t8, d) for t8, d in pairs)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in FP8_CASES])
def test_fp8_forward_obeys_the_tolerance_rule(case, device):
    check_fp8(case, device)


def check_fp8(case, device):
    s = case.shape
    (q8, k8, v8), descales, (q, k, v) = _quantized(case, device)
    sm_scale = 1.0 / math.sqrt(s.head_dim)
    o = poisoned_like(q8, shape=(*q8.shape[:-1], v8.shape[-1]), dtype=case.out)
    lse = poisoned_like(q8, shape=q8.shape[:3], dtype=torch.float32)
    stacked = stack_descales(tuple(descales.values()), s.batch, s.h_kv, q8.device)
    o, lse = _flash_fwd(q8, k8, v8, s.causal, sm_scale, o=o, lse=lse, descale=stacked, out_dtype=case.out)
    assert o.dtype == case.out and lse.dtype == torch.float32

    o64, lse64 = naive_attention(q, k, v, s.causal, sm_scale, dtype=torch.float64, return_lse=True)
    same, same_lse = fp8_attention(q8, k8, v8, s.causal, sm_scale, out_dtype=case.out, return_lse=True,
                                   **descales)
    assert_close_to_reference(o, o64, same, name="fp8 o")
    rows = rows_with_a_key(s.n_q, s.n_k, s.causal)
    assert_close_to_reference(lse[:, :, rows], lse64[:, :, rows], same_lse[:, :, rows], name="fp8 lse")
    blind = slice(0, rows.start)
    assert torch.all(o[:, :, blind] == 0) and torch.all(lse[:, :, blind] == float("-inf"))

    public = kernels.flash_attention(q8, k8, v8, causal=s.causal, sm_scale=sm_scale, out_dtype=case.out,
                                     **descales)
    assert torch.equal(public, o), "the public call and the launcher differ"


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fp8_forward_long_sequence_gpu(causal, device):
    """The GPU's own fp8 MMAs and conversions (the CPU rounds P by hand): GQA 8:2 at 4k, head dim 128."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need sm_89 or newer")
    check_fp8(Fp8Case(AttentionCase(1, 8, 2, 4096, 4096, 128, causal)), device)


def test_varlen_with_per_sequence_descales(device):
    """Packed sequences, one of them empty, each with its own descales; causal and bottom-right per sequence."""
    torch.manual_seed(1)
    lengths_q, lengths_k, h_q, h_kv, d = (5, 0, 70, 40), (33, 7, 90, 40), 4, 2, 48
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device=device)
                  for n in (lengths_q, lengths_k))
    q = torch.randn(sum(lengths_q), h_q, d, device=device) * 3
    k, v = (torch.randn(sum(lengths_k), h_kv, d, device=device) for _ in range(2))
    (q8, qd), (k8, kd), (v8, vd) = (quantize_fp8(t, E4M3, g, c) for t, g, c in ((q, 2, cu_q), (k, 1, cu_k),
                                                                                   (v, 1, cu_k)))
    assert qd.shape == (4, h_kv) and kd.shape == (4, h_kv)
    descales = dict(q_descale=qd, k_descale=kd, v_descale=vd)
    o, lse = kernels.flash_attention_varlen(q8, k8, v8, cu_q, cu_k, 70, 90, causal=True, return_lse=True,
                                            **descales)
    deq = [dequantize_fp8(t, s, c) for t, s, c in ((q8, qd, cu_q), (k8, kd, cu_k), (v8, vd, cu_k))]
    o64 = naive_attention_varlen(*deq, cu_q, cu_k, causal=True, dtype=torch.float64)
    same = fp8_attention(q8, k8, v8, True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **descales)
    assert_close_to_reference(o, o64, same, name="fp8 varlen o")
    assert lse.shape == (h_q, sum(lengths_q))


VARIANTS = [VARIANT_CASES[i] for i in (8, 9)]  # sinks + window; window + softcap + ALiBi


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("variant", [pytest.param(c, id=c.id) for c in VARIANTS])
def test_variants_combine_with_fp8(variant, causal, device):
    case = Fp8Case(AttentionCase(**{**variant.shape.__dict__, "causal": causal}))
    (q8, k8, v8), descales, (q, k, v) = _quantized(case, device, seed=2)
    options = variant.options(device)
    o = kernels.flash_attention(q8, k8, v8, causal=causal, **options, **descales)
    o64 = naive_attention(q, k, v, causal, dtype=torch.float64, **options)
    same = fp8_attention(q8, k8, v8, causal, **options, **descales)
    assert_close_to_reference(o, o64, same, name=f"fp8 {variant.id}")


def test_mods_combine_with_fp8(device):
    """A mask_mod and a score_mod on fp8 scores: the same attention as the built-in window and ALiBi."""
    case = Fp8Case(AttentionCase(1, 4, 2, 97, 97, 32, False))
    (q8, k8, v8), descales, (q, k, v) = _quantized(case, device, seed=3)
    slopes = torch.rand(4, device=device) * 0.5
    o = kernels.flash_attention(q8, k8, v8, mask_mod=mods.sliding_window(20, 0), score_mod=mods.alibi(slopes),
                                **descales)
    options = dict(window_size=(20, 0), alibi_slopes=slopes)
    o64 = naive_attention(q, k, v, False, dtype=torch.float64, **options)
    same = fp8_attention(q8, k8, v8, False, **options, **descales)
    assert_close_to_reference(o, o64, same, name="fp8 with mods")


def test_fp8_runs_as_one_custom_op_under_torch_compile(device):
    case = Fp8Case(AttentionCase(1, 2, 1, 33, 33, 32, True))
    (q8, k8, v8), descales, _ = _quantized(case, device)
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v, d: kernels.flash_attention(q, k, v, causal=True, **d), backend=backend,
                             fullgraph=True)
    o = compiled(q8, k8, v8, descales)
    assert any("flash_attn_fp8_fwd" in t for t in targets), targets
    assert torch.equal(o, kernels.flash_attention(q8, k8, v8, causal=True, **descales))


@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=["e4m3", "e5m2"])
def test_quantization_round_trips_bitwise(fp8, device):
    """Dequantized then quantized with the same descale gives back the same bits; the largest |x| maps to the
    format's largest value; and the kernel's own rounding of P (tiles.py) matches PyTorch's cast bit for bit."""
    torch.manual_seed(4)
    x = torch.randn(2, 4, 33, 24, device=device) * 5
    x8, descale = quantize_fp8(x, fp8, group=2)
    assert descale.shape == (2, 2)
    back = (dequantize_fp8(x8, descale) / descale.repeat_interleave(2, 1)[:, :, None, None]).to(fp8)
    assert torch.equal(back.view(torch.uint8), x8.view(torch.uint8))
    assert x8.float().abs().amax().item() == torch.finfo(fp8).max

    values = torch.arange(256, dtype=torch.uint8).view(fp8).float()
    values = values[~values.signbit() & (values <= 1)].sort().values  # p: 0 to 1, never -0
    midpoints = (values[1:] + values[:-1]) / 2
    probe = torch.cat([values, midpoints, midpoints.nextafter(torch.ones(())), midpoints.nextafter(torch.zeros(())),
                       torch.rand(4096)])
    rounded = torch.empty(probe.shape, dtype=fp8, device=device)
    _round_kernel[(triton.cdiv(probe.numel(), 1024),)](probe.to(device), rounded, probe.numel(), BLOCK=1024)
    assert torch.equal(rounded.cpu().view(torch.uint8), probe.to(fp8).view(torch.uint8))


def test_bad_fp8_input_gets_clear_errors(device, monkeypatch):
    case = Fp8Case(AttentionCase(2, 4, 2, 16, 16, 32, False))
    (q8, k8, v8), descales, (q, k, v) = _quantized(case, device)

    def expect(error, match, *args, **kwargs):
        with pytest.raises(error, match=match):
            kernels.flash_attention(*args, **kwargs)

    expect(ValueError, "missing v_descale", q8, k8, v8, q_descale=descales["q_descale"],
           k_descale=descales["k_descale"])
    expect(ValueError, r"need q_descale, k_descale and v_descale", q8, k8, v8)
    expect(ValueError, r"k_descale must have one element .* \(B, Hkv\) = \(2, 2\)", q8, k8, v8,
           **{**descales, "k_descale": torch.ones(4, device=device)})
    expect(TypeError, "v_descale must be float32", q8, k8, v8,
           **{**descales, "v_descale": descales["v_descale"].half()})
    expect(TypeError, r"q_descale, k_descale, v_descale apply to fp8 q, k and v .* q is torch.float32", q, k, v,
           **descales)
    expect(TypeError, "out_dtype must be torch.bfloat16 or torch.float16", q8, k8, v8, out_dtype=torch.float32,
           **descales)
    expect(ValueError, "dropout_p must be 0", q8, k8, v8, dropout_p=0.1, **descales)
    expect(TypeError, "k has dtype torch.float8_e5m2 but q has torch.float8_e4m3fn", q8, k8.to(E5M2), v8,
           **descales)
    with pytest.raises(ValueError, match="forward-only"):
        kernels.flash_attention(q8, k8, v8.clone().requires_grad_(), **descales)
    monkeypatch.setenv(CHIP_ENV, "sm_86")  # an RTX 3090: bf16 tensor cores, no fp8 ones
    expect(RuntimeError, r"fp8 tensor cores \(sm_89, Ada, or newer\); q is on sm_86", q8, k8, v8, **descales)
