"""Low precision and latent attention, in numbers: fp8 formats, scales, where attention loses precision,
the fp8 KV cache's two scale schemes, and what MLA's latent cache saves.

    python -m tutorial.lowprec

1. The two fp8 formats, from torch.finfo: e4m3fn (more mantissa, for
   activations and weights) and e5m2 (more range, for gradients).
2. Why scales. N(0, 1) values times 1e-3 cast to e4m3 directly land among
   its subnormals or flush to zero; divided by a scale that maps their
   largest magnitude to 448 first, every value keeps 3 mantissa bits
   (relative error at most 2^-4). One outlier row spoils a per-tensor scale
   for every other row; one scale per row does not care.
3. Where precision goes in attention: the forward emulated in float64 with
   one more operand rounded at each line (q and k to e4m3, then v, then P for
   the P.V product as FlashAttention-3 and the Triton tutorial do), each
   line's max error against float64 attention on the unrounded inputs; last,
   `kernels.flash_attention` itself on the e4m3 inputs (kernels/fp8.py).
4. The fp8 KV cache through `kernels.decode_attention` (under Triton's
   interpreter: it sets TRITON_INTERPRET=1 unless the variable is set), with
   one scale per tensor and one per (token, kv head), on a cache whose kv
   head 0 is 100, then 10^5 times smaller than kv head 1: a floating-point
   format shrugs off a range mismatch until it passes the format's own
   range; then the small head's values fall below its smallest subnormal.
5. MLA: bytes per token of DeepSeek-V3's latent cache against its MHA cache,
   FLOPs per byte of a decode step in each form, the kernel's 576 = 512 + 64
   head-dim tiles, and the absorbed form against the naive one in float64.
"""
import math
import os

E4M3, E5M2 = "float8_e4m3fn", "float8_e5m2"
SEED = 0
SMALL_HEADS = (1e-2, 1e-5)  # section 4: kv head 0's keys and values this much smaller than kv head 1's


def formats():
    """(name, exponent bits, mantissa bits, max, smallest normal, smallest subnormal, relative step) per format."""
    import torch

    rows = []
    for name, exponent_bits in ((E4M3, 4), (E5M2, 5)):
        info = torch.finfo(getattr(torch, name))
        mantissa_bits = 7 - exponent_bits
        rows.append((name, exponent_bits, mantissa_bits, info.max, info.smallest_normal,
                     info.smallest_normal * 2.0 ** -mantissa_bits, info.eps))
    return rows


def quantize(x, scale, dtype_name=E4M3):
    """x / scale rounded to fp8, then times scale again: what the fp8 copy of x holds, in x's dtype."""
    import torch

    return (x / scale).to(getattr(torch, dtype_name)).to(x.dtype) * scale


def max_relative_error(approx, exact):
    return ((approx - exact).abs() / exact.abs()).max().item()


def scale_errors():
    """Section 2: max relative errors, (unscaled, scaled) for small values; (per tensor, per row) with an outlier row."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    small = torch.randn(4096, generator=gen, dtype=torch.float64) * 1e-3
    unscaled = max_relative_error(quantize(small, 1.0), small)
    scaled = max_relative_error(quantize(small, small.abs().max() / 448), small)
    rows = torch.randn(8, 128, generator=gen, dtype=torch.float64)
    rows[0] *= 1e4  # one outlier row
    per_tensor = quantize(rows, rows.abs().max() / 448)
    per_row = quantize(rows, rows.abs().amax(-1, keepdim=True) / 448)
    others = slice(1, None)  # the rows that are not the outlier
    return unscaled, scaled, max_relative_error(per_tensor[others], rows[others]), \
        max_relative_error(per_row[others], rows[others])


def attention_stages(n=256, head_dim=64):
    """Section 3: [(what is in fp8, max error)], the forward in float64 with operands rounded as the fp8 kernel
    rounds them (one scale per tensor; P unscaled: it lies in [0, 1] after subtracting the row max)."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    q, k, v = torch.randn(3, n, head_dim, generator=gen, dtype=torch.float64)
    exact = torch.softmax(q @ k.T / math.sqrt(head_dim), dim=-1) @ v

    def to_fp8(x):
        return quantize(x, x.abs().max() / 448)

    def forward(q, k, v, round_p):
        s = q @ k.T / math.sqrt(head_dim)
        p = torch.exp(s - s.amax(-1, keepdim=True))  # in [0, 1], the row max exactly 1
        l = p.sum(-1, keepdim=True)  # the normaliser from the unrounded P, as the kernels keep it in fp32
        if round_p:
            p = quantize(p, 1.0)
        return (p @ v) / l

    stages = [("nothing (float64)", forward(q, k, v, False)),
              ("q, k", forward(to_fp8(q), to_fp8(k), v, False)),
              ("q, k, v", forward(to_fp8(q), to_fp8(k), to_fp8(v), False)),
              ("q, k, v and P", forward(to_fp8(q), to_fp8(k), to_fp8(v), True)),
              ("the fp8 kernel", fp8_kernel(q, k, v))]
    return [(what, (out - exact).abs().max().item()) for what, out in stages]


def fp8_kernel(q, k, v):
    """kernels.flash_attention on the same q, k, v in e4m3 with one descale per tensor (kernels/fp8.py): q.k and
    P.V in fp8, P rounded to e4m3 after the running max, a bf16 output."""
    import torch

    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is imported: Triton reads it then
    from kernels import flash_attention
    from reference.fp8 import quantize_fp8

    # (N, D) -> (1, 1, N, D), one scale for the whole tensor
    (q8, qd), (k8, kd), (v8, vd) = (quantize_fp8(t.float()[None, None]) for t in (q, k, v))
    with torch.no_grad():
        out = flash_attention(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd)
    return out[0, 0].double()


def kv_cache_schemes(small_head, batch=2, heads_q=8, heads_kv=2, n=100, head_dim=64):
    """Section 4: {scheme: (relative error of kv head 0's outputs, of kv head 1's, kernel vs reference)}.

    kv head 0's keys and values are small_head times kv head 1's. The errors are against float64 attention
    on the unquantized cache, relative to the largest output of those heads; the last number is the
    kernel against reference.paged in float64 on the same fp8 cache (its own accuracy)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    import kernels
    from reference.paged import paged_attention

    gen = torch.Generator().manual_seed(SEED)
    q = torch.randn(batch, heads_q, 1, head_dim, generator=gen).to(torch.bfloat16)
    k, v = torch.randn(2, batch, heads_kv, n, head_dim, generator=gen)
    k[:, 0] *= small_head
    v[:, 0] *= small_head
    lengths = torch.full((batch,), n, dtype=torch.int32)
    exact = paged_attention(q, k, v, lengths, dtype=torch.float64)  # (B, Hq, 1, D)
    group = heads_q // heads_kv
    results = {}
    for scheme in ("per tensor", "per token and head"):
        if scheme == "per tensor":
            k_scale, v_scale = k.abs().amax().reshape(1) / 448, v.abs().amax().reshape(1) / 448
            k8, v8 = (k / k_scale).to(torch.float8_e4m3fn), (v / v_scale).to(torch.float8_e4m3fn)
        else:  # one scale per cache row and kv head: shaped like the cache's first three dims
            k_scale, v_scale = k.abs().amax(-1) / 448, v.abs().amax(-1) / 448
            k8, v8 = (k / k_scale[..., None]).to(torch.float8_e4m3fn), (v / v_scale[..., None]).to(torch.float8_e4m3fn)
        with torch.no_grad():
            out = kernels.decode_attention(q, k8, v8, lengths, k_scale=k_scale, v_scale=v_scale).double()
        same_cache = paged_attention(q, k8, v8, lengths, k_scale=k_scale, v_scale=v_scale, dtype=torch.float64)
        relative = []
        for head in range(heads_kv):
            rows = slice(head * group, (head + 1) * group)  # the query heads that read kv head `head`
            relative.append(((out[:, rows] - exact[:, rows]).abs().max() / exact[:, rows].abs().max()).item())
        results[scheme] = (*relative, (out - same_cache).abs().max().item())
    return results


def mla_numbers():
    """Section 5: DeepSeek-V3's cache bytes and decode intensity, the kernel's head-dim tiles, absorbed vs naive."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from kernels.paged import head_dim_tiles, shares_storage
    from reference.mla import DEEPSEEK_V3 as V3
    from reference.mla import LatentCache, MLAConfig, MultiHeadLatentAttention, cache_bytes_per_token

    latent, mha = (b // V3.num_layers for b in cache_bytes_per_token(V3, 2))  # bf16, one layer
    # One decode step, per cached token: scores and weighted sum for every head, over what it reads.
    mla_flops = 2 * V3.num_heads * (V3.latent_dim + V3.kv_lora_rank)
    mha_flops = 2 * V3.num_heads * (V3.qk_head_dim + V3.v_head_dim)
    cache = LatentCache(1, V3.kv_lora_rank, V3.qk_rope_head_dim, 16, dtype=torch.bfloat16)

    torch.manual_seed(SEED)
    config = MLAConfig()
    module = MultiHeadLatentAttention(**config.attention_kwargs(), dtype=torch.float64).eval()
    x = torch.randn(2, 12, config.d_model, dtype=torch.float64)
    tiny_cache = LatentCache(2, config.kv_lora_rank, config.qk_rope_head_dim, 16, dtype=torch.float64)
    with torch.no_grad():
        difference = (module(x) - module(x, tiny_cache)).abs().max().item()
    return dict(latent_bytes=latent, mha_bytes=mha, mla_flops_per_byte=mla_flops / latent,
                mha_flops_per_byte=mha_flops / mha, tiles=head_dim_tiles(V3.latent_dim),
                v_is_view=shares_storage(cache.k, cache.v), absorbed_vs_naive=difference)


def main():
    print("1. fp8 formats (torch.finfo)")
    print(f"   {'format':14} {'exp':>3} {'man':>3} {'max':>8} {'min normal':>11} {'min subnormal':>13} {'step':>6}")
    for name, e, m, largest, normal, subnormal, step in formats():
        print(f"   {name:14} {e:3} {m:3} {largest:8g} {normal:11.3g} {subnormal:13.3g} {step:6g}")

    unscaled, scaled, per_tensor, per_row = scale_errors()
    print("\n2. scales (e4m3, max relative error)")
    print(f"   N(0, 1) * 1e-3, cast directly:          {unscaled:.3g}")
    print(f"   the same, amax scaled to 448 first:     {scaled:.3g}   (3 mantissa bits: at most 2^-4 = 0.0625)")
    print(f"   7 rows beside a 1e4x row, one scale:    {per_tensor:.3g}")
    print(f"   the same rows, one scale per row:       {per_row:.3g}")

    print("\n3. attention (N 256, D 64), max error against float64 with these operands in e4m3")
    for what, error in attention_stages():
        print(f"   {what:20} {error:.3g}")

    print("\n4. fp8 KV cache through kernels.decode_attention (bf16 q, e4m3 cache, kv head 0 smaller than kv head 1),"
          "\n   error against float64 on the unquantized cache, relative to each head's largest output")
    for small_head in SMALL_HEADS:
        for scheme, (head0, head1, kernel) in kv_cache_schemes(small_head).items():
            print(f"   head 0 {f'{small_head:g}x':6} {scheme:18}  kv head 0 {head0:6.3g}   kv head 1 {head1:6.3g}   "
                  f"(kernel vs reference on the same cache: {kernel:.1e})")

    mla = mla_numbers()
    print("\n5. MLA, DeepSeek-V3 (128 heads; bf16; per layer and token)")
    print(f"   MHA cache (K 192 + V 128 per head): {mla['mha_bytes']} bytes")
    print(f"   latent cache (512 + 64, one row):   {mla['latent_bytes']} bytes, "
          f"{mla['mha_bytes'] / mla['latent_bytes']:.1f}x smaller")
    print(f"   decode FLOPs per byte read: MHA {mla['mha_flops_per_byte']:.0f}, absorbed MLA "
          f"{mla['mla_flops_per_byte']:.0f}")
    print(f"   q/k head dim 576 as tiles {mla['tiles'][0]} + {mla['tiles'][1]} (not padded to 1024); "
          f"v a view of k's first 512 columns: {mla['v_is_view']}")
    print(f"   tiny MLA (8 heads), absorbed vs naive in float64: max difference {mla['absorbed_vs_naive']:.1e}")


if __name__ == "__main__":
    main()
