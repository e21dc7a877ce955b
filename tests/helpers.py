"""The tolerance rule and the small helpers that every kernel test shares.

The rule is FlashAttention's: an implementation in a given dtype may be at
most `factor` times as far from the float64 reference as PyTorch's own
computation in that same dtype (2x for outputs, 3x for gradients). It adapts
to dtype and shape by itself, unlike a fixed atol. A tiny absolute floor, one
unit in the last place of the largest reference value (at least of 1.0), is
added to PyTorch's error before scaling, so the rule never demands less than
rounding when PyTorch happens to be exact (e.g. dK with a single key, which
is 0 analytically and exactly 0 in PyTorch's order of operations).
"""
import torch

from reference.llama import right_pad

OUTPUT_FACTOR = 2.0
GRADIENT_FACTOR = 3.0


def max_abs_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest |actual - reference|, computed in float64."""
    if actual.shape != reference.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != reference shape {tuple(reference.shape)}")
    if actual.numel() == 0:
        return 0.0
    diff = (actual.double() - reference.double()).abs()
    # NaN compares false with everything; count it as an infinite error.
    return float("inf") if torch.isnan(diff).any() else diff.max().item()


def tolerance_floor(reference: torch.Tensor, dtype: torch.dtype) -> float:
    """One unit in the last place, in `dtype`, of the largest reference value (or of 1.0 if larger)."""
    scale = max(1.0, reference.abs().max().item()) if reference.numel() else 1.0
    return torch.finfo(dtype).eps * scale


def assert_close_to_reference(actual, reference64, torch_same_dtype, *, factor=OUTPUT_FACTOR, name="output"):
    """Assert `actual` obeys the tolerance rule; say by how much it missed if not.

    actual            the implementation under test, in the dtype under test
    reference64       the same computation in float64
    torch_same_dtype  PyTorch's own computation in the dtype under test
    """
    error = max_abs_error(actual, reference64)
    torch_error = max_abs_error(torch_same_dtype, reference64)
    allowed = factor * (torch_error + tolerance_floor(reference64, actual.dtype))
    if not error <= allowed:
        diff = (actual.double() - reference64.double()).abs()
        diff = torch.nan_to_num(diff, nan=float("inf"))
        where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{name}: max error {error:.3e} at {where} exceeds {allowed:.3e} "
            f"= {factor}x (PyTorch's {torch_error:.3e} + 1 ulp of {actual.dtype})"
        )
    return error, allowed


def assert_close(actual, expected, what, atol=1e-12, rtol=1e-12):
    """Tight comparison for float64 computations that must agree to rounding; the message says what differed."""
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda default: f"{what}: {default}")


def poisoned_like(t: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """A buffer full of NaN: any element a kernel forgets to write shows up as NaN."""
    return torch.full(shape or t.shape, float("nan"), dtype=dtype or t.dtype, device=t.device)


# ----------------------------------------------------------------------------
# Attention baselines: float64 truth, and PyTorch's own SDPA in the dtype under test
# ----------------------------------------------------------------------------
def attention_lse(q, k, v, causal, sm_scale, dtype):
    """Per-row natural log-sum-exp of the scores, computed in `dtype` (-inf for a row with no key)."""
    from reference.functional import causal_visibility, repeat_kv

    k = repeat_kv(k.to(dtype), q.shape[1] // k.shape[1])
    scores = (q.to(dtype) @ k.transpose(-2, -1)) * sm_scale
    if causal:
        scores = scores.masked_fill(~causal_visibility(q.shape[2], k.shape[2], q.device), float("-inf"))
    return torch.logsumexp(scores, dim=-1)


def rows_with_a_key(n_q, n_k, causal):
    """Query rows that see at least one key (all of them unless causal with Nq > Nk)."""
    first = max(0, n_q - n_k) if causal else 0
    return slice(first, n_q)


def sdpa_attention(q, k, v, causal, sm_scale):
    """F.scaled_dot_product_attention with GQA and the bottom-right causal mask.

    Rows that see no key come out as NaN from SDPA; compare only `rows_with_a_key`.
    """
    import torch.nn.functional as F
    from reference.functional import causal_visibility

    mask = causal_visibility(q.shape[2], k.shape[2], q.device) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sm_scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def assert_same_tokens(got, expected, what):
    """Greedy generations agree token for token; else the message names the first (sequence, step) that differs."""
    differ = (got != expected).nonzero()
    assert not len(differ), f"{what}: first difference at (sequence, step) {tuple(differ[0].tolist())}"


def assert_no_near_greedy_ties(model, prompts, generated, min_margin=1e-4):
    """Exact token equality is meaningful only if no step's top two logits are within rounding of each other.

    model: the reference decoder that generated `generated` (B, steps) greedily from `prompts` (lists of ids).
    """
    sequences = [p + g for p, g in zip(prompts, generated.tolist())]
    steps = generated.shape[1]
    with torch.no_grad():
        logits = model(right_pad(sequences, device=next(model.parameters()).device))
    for b, prompt in enumerate(prompts):
        n = len(prompt)
        top2 = logits[b, n - 1:n - 1 + steps].topk(2, dim=-1).values  # (steps, 2)
        margin = (top2[:, 0] - top2[:, 1]).min().item()
        assert margin > min_margin, f"sequence {b}: a near tie ({margin:.1e}) would make the comparison luck"
