"""FLOP counts for attention, by FlashAttention's convention.

Forward, per (batch, query head): two matmuls of the same size,
    S = Q K^T    (Nq x D) @ (D x Nk)    2 Nq Nk D FLOPs
    O = P V      (Nq x Nk) @ (Nk x D)   2 Nq Nk D FLOPs
so 4 B Hq Nq Nk D in all. The softmax (exp, max, sum) is O(Nq Nk), not
O(Nq Nk D), and is not counted.

Causal: about half of S is masked, so half the work is counted (0.5), the
convention FlashAttention, SDPA and the Triton tutorial all report with.

Backward: five matmuls of that size (S recomputed, dV = P^T dO, dP = dO V^T,
dQ = dS K, dK = dS^T Q), so 2.5x the forward; forward plus backward is 3.5x.

GQA: counted per query head. Sharing K and V between query heads saves
memory traffic, not arithmetic.
"""

MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
CAUSAL_FACTOR = 0.5


def attention_flops(batch, heads_q, n_q, n_k, head_dim, causal=False, mode="fwd"):
    """FLOPs of one attention call in `mode` ("fwd", "bwd" or "fwd+bwd")."""
    if mode not in MODE_FACTOR:
        raise ValueError(f"mode must be one of {sorted(MODE_FACTOR)}, got {mode!r}")
    flops = 4.0 * batch * heads_q * n_q * n_k * head_dim * MODE_FACTOR[mode]
    return flops * CAUSAL_FACTOR if causal else flops


def tflops_per_s(flops, time_ms):
    """Throughput in TFLOP/s of `flops` done in `time_ms` milliseconds."""
    return flops / (time_ms * 1e-3) / 1e12
