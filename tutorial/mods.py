"""Write your own attention variant: a mask_mod, its block mask, a score_mod and its derivative, on a CPU.

    python -m tutorial.mods [--n 384]

1. A mask_mod is a @triton.jit function of (b, h, q_idx, kv_idx, args) that
   returns True where a query sees a key. This one is Longformer's pattern,
   which no built-in switch spells: a band of +-WINDOW keys around each query,
   plus N_GLOBAL global tokens that see everything and that everything sees.
   Its twin in plain PyTorch, the same expression, is the float64 reference.
2. `kernels.create_block_mask` runs the mask_mod on every 64 x 64 tile once
   and keeps, per query block, the key blocks it sees partly (the kernels apply
   the mask_mod there) and wholly (no mask at all); the rest are never loaded.
   The script draws the tiles and checks the lists against
   reference/block_mask.py, which builds them with plain loops.
3. flash_attention(q, k, v, block_mask=...) forward and backward, against the
   float64 reference.
4. A score_mod is a @triton.jit function of (score, b, h, q_idx, kv_idx, args):
   here a learned penalty per head on the log of the distance,
   score - slope[h] * log(1 + |q - kv|). Its derivative is a second function:
   d score passes through unchanged, and d slope[h] = -sum(grad * log(1 + |q - kv|))
   is added into grad_args[0] with one atomic add per tile. Without the
   derivative, a call that needs a gradient is refused.

Everything runs under Triton's interpreter (TRITON_INTERPRET=1, set here unless
it is set) on CPU tensors, so the mods are plain Python while they run: put
`breakpoint()` in global_local's body and `p q_idx.handle.data` shows the tile of
query indices it was called with.
"""
import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the functions below

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

N_GLOBAL = 8  # tokens 0..7 are global (Longformer's [CLS] and question tokens)
WINDOW = 64  # every other query sees the keys within +-64 of itself
BLOCK = 64  # block-mask blocks: the interpreter's 64 x 32 tiles fit inside
HEADS, HEAD_DIM = 2, 16
SYMBOLS = {0: ".", 1: "P", 2: "F"}  # never loaded, partial (masked), full (no mask)


# ----------------------------------------------------------------------------
# 1. The mask_mod and its twin
# ----------------------------------------------------------------------------
@triton.jit
def global_local(b, h, q_idx, kv_idx, args):
    """args = (n_global, window). q_idx and kv_idx are tiles that broadcast (a column and a row)."""
    n_global = args[0]
    window = args[1]
    band = (kv_idx >= q_idx - window) & (kv_idx <= q_idx + window)
    return band | (q_idx < n_global) | (kv_idx < n_global)


def global_local_reference(n_global, window):
    def mask(b, h, q_idx, kv_idx):
        band = (kv_idx >= q_idx - window) & (kv_idx <= q_idx + window)
        return band | (q_idx < n_global) | (kv_idx < n_global)
    return mask


# ----------------------------------------------------------------------------
# 4. The score_mod, its derivative, and its twin
# ----------------------------------------------------------------------------
@triton.jit
def _log_distance(q_idx, kv_idx):
    return tl.log(1.0 + tl.abs(q_idx - kv_idx).to(tl.float32))


@triton.jit
def log_distance_penalty(score, b, h, q_idx, kv_idx, args):
    """args = (SLOPES,): score - SLOPES[h] * log(1 + |q - kv|)."""
    slope = tl.load(args[0] + h)
    return score - slope * _log_distance(q_idx, kv_idx)


@triton.jit
def log_distance_penalty_bwd(grad, score, b, h, q_idx, kv_idx, args, grad_args, ACCUMULATE: tl.constexpr):
    """grad is dL/d(new score). d(new score)/d score = 1, so return grad; with ACCUMULATE (once per score,
    in the dK/dV kernel) add dL/d slope[h] = -sum(grad * log(1 + |q - kv|)) over the tile into grad_args[0]."""
    if ACCUMULATE:
        contribution = grad * _log_distance(q_idx, kv_idx)
        tl.atomic_add(grad_args[0] + h, -tl.sum(tl.sum(contribution, axis=1), axis=0))
    return grad


def log_distance_penalty_reference(slopes):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * torch.log1p((q_idx - kv_idx).abs().to(score.dtype))
    return score_mod


# ----------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------
def errors(ours, reference):
    """Max abs error of each result against its float64 reference."""
    return ", ".join(f"{name} {(ours[name].double() - reference[name]).abs().max().item():.1e}" for name in ours)


def run(n, score_mod=None, block_mask=None, slopes=None):
    """Forward and backward through the kernels and through the float64 reference: two dicts of results."""
    from kernels import flash_attention
    from reference import naive_attention_mods

    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, HEADS, n, HEAD_DIM, generator=g) for _ in range(4))
    leaves = {name: t.clone().requires_grad_() for name, t in (("q", q), ("k", k), ("v", v))}
    if slopes is not None:
        leaves["slope"] = slopes.clone().requires_grad_()
    kernel_score = None if score_mod is None else score_mod(leaves.get("slope"))
    o = flash_attention(leaves["q"], leaves["k"], leaves["v"], block_mask=block_mask, score_mod=kernel_score)
    o.backward(do)
    ours = {"o": o, **{f"d{name}": t.grad for name, t in leaves.items()}}

    ref_leaves = {name: t.detach().double().requires_grad_() for name, t in leaves.items()}
    ref_score = None if slopes is None else log_distance_penalty_reference(ref_leaves["slope"])
    o64 = naive_attention_mods(ref_leaves["q"], ref_leaves["k"], ref_leaves["v"], score_mod=ref_score,
                               mask_mod=global_local_reference(N_GLOBAL, WINDOW))
    o64.backward(do.double())
    return ours, {"o": o64, **{f"d{name}": t.grad for name, t in ref_leaves.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=384, help="tokens (Nq = Nk)")
    n = parser.parse_args(argv).n

    from kernels import MaskMod, ScoreMod, create_block_mask
    from reference.block_mask import create_block_mask as plain_block_mask

    print(f"1. mask_mod global_local: {N_GLOBAL} global tokens and a band of +-{WINDOW} keys, N = {n}")
    mask_mod = MaskMod(global_local, (N_GLOBAL, WINDOW))

    block_mask = create_block_mask(mask_mod, None, None, n, n, device="cpu", BLOCK_SIZE=BLOCK)
    plain = plain_block_mask(global_local_reference(N_GLOBAL, WINDOW), None, None, n, n, BLOCK_SIZE=BLOCK)
    num_kv = block_mask.kv.shape[-1] - 1
    print(f"2. its block mask ({BLOCK} x {BLOCK} blocks; F full: no mask, P partial: mask_mod applied, "
          ". never loaded):")
    for row in range(block_mask.kv.shape[3]):
        kinds = [0] * num_kv
        for kind, lists in ((1, block_mask.kv[0, 0, 0, row]), (2, block_mask.kv[1, 0, 0, row])):
            for col in lists[1:1 + lists[0]].tolist():
                kinds[col] = kind
        print("     " + " ".join(SYMBOLS[kind] for kind in kinds))
    skipped = round(block_mask.sparsity() * block_mask.kv.shape[3] * num_kv)
    same = torch.equal(block_mask.kv, plain.kv) and torch.equal(block_mask.q, plain.q)
    print(f"   sparsity {block_mask.sparsity():.2f} ({skipped} of {block_mask.kv.shape[3] * num_kv} tiles skipped); "
          f"the plain builder agrees: {'yes' if same else 'NO'}")

    ours, reference = run(n, block_mask=block_mask)
    print(f"3. flash_attention(block_mask=...) against float64: {errors(ours, reference)}")

    slopes = torch.tensor([0.5, 0.1])
    ours, reference = run(n, block_mask=block_mask, slopes=slopes, score_mod=lambda s: ScoreMod(
        log_distance_penalty, (s,), bwd=log_distance_penalty_bwd))
    print(f"4. score_mod log_distance_penalty, learned slopes, with its derivative, against float64: "
          f"{errors(ours, reference)}")
    try:
        run(n, block_mask=block_mask, slopes=slopes, score_mod=lambda s: ScoreMod(log_distance_penalty, (s,)))
    except ValueError as exc:
        print(f"   without the derivative, a gradient is refused: {exc}")


if __name__ == "__main__":
    main()
