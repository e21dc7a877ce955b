"""The tolerance rule and the small helpers that every kernel test shares.

The rule is FlashAttention's: an implementation in a given dtype may be at
most `factor` times as far from the float64 reference as PyTorch's own
computation in that same dtype (2x for outputs, 3x for gradients). It adapts
to dtype and shape by itself, unlike a fixed atol. A tiny absolute floor, two
units in the last place of the largest reference value, keeps the rule from
demanding more than the dtype can represent when PyTorch happens to be exact.
"""
import torch

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
    """Two units in the last place of the largest reference value, in `dtype`."""
    scale = max(1.0, reference.abs().max().item()) if reference.numel() else 1.0
    return 2.0 * torch.finfo(dtype).eps * scale


def assert_close_to_reference(actual, reference64, torch_same_dtype, *, factor=OUTPUT_FACTOR, name="output"):
    """Assert `actual` obeys the tolerance rule; say by how much it missed if not.

    actual            the implementation under test, in the dtype under test
    reference64       the same computation in float64
    torch_same_dtype  PyTorch's own computation in the dtype under test
    """
    error = max_abs_error(actual, reference64)
    torch_error = max_abs_error(torch_same_dtype, reference64)
    allowed = factor * torch_error + tolerance_floor(reference64, actual.dtype)
    if not error <= allowed:
        diff = (actual.double() - reference64.double()).abs()
        diff = torch.nan_to_num(diff, nan=float("inf"))
        where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{name}: max error {error:.3e} at {where} exceeds {allowed:.3e} "
            f"= {factor}x PyTorch's {torch_error:.3e} + floor ({actual.dtype})"
        )
    return error, allowed


def poisoned_like(t: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """A buffer full of NaN: any element a kernel forgets to write shows up as NaN."""
    return torch.full(shape or t.shape, float("nan"), dtype=dtype or t.dtype, device=t.device)
