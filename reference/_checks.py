"""Argument checks shared by the reference modules.

Each check raises a ValueError (or a TypeError for something that is not a
tensor or an int) whose message names the offending argument and says what
was expected, so a caller never has to decode a matmul shape error from deep
inside a forward pass.
"""
import operator

import torch


def check_divisible(value: int, value_name: str, divisor: int, divisor_name: str) -> None:
    """Require `value` to be a multiple of the positive int `divisor`, e.g. d_out of num_heads."""
    for name, n in ((value_name, value), (divisor_name, divisor)):
        try:
            operator.index(n)  # accepts int and int-likes (numpy integers), refuses 2.0
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(n).__name__}") from None
    if divisor < 1:
        raise ValueError(f"{divisor_name} must be >= 1, got {divisor}")
    if value % divisor != 0:
        raise ValueError(f"{value_name} ({value}) must be divisible by {divisor_name} ({divisor})")


def check_tokens(x, d_in: int, name: str = "x", d_name: str = "d_in", context_length: int | None = None) -> None:
    """Require `x` to be a (batch, tokens, d_in) tensor with at most context_length tokens."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (batch, tokens, {d_name}), got shape {tuple(x.shape)}")
    if x.shape[-1] != d_in:
        raise ValueError(f"{name} has last dimension {x.shape[-1]} but {d_name} is {d_in}")
    if context_length is not None and x.shape[1] > context_length:
        # The causal mask and the rotary tables are precomputed up to context_length.
        raise ValueError(f"{name} has {x.shape[1]} tokens but context_length is {context_length}")


def check_same_batch(x: torch.Tensor, context: torch.Tensor) -> None:
    """Require x and context to carry the same number of sequences."""
    if x.shape[0] != context.shape[0]:
        raise ValueError(f"x and context must have the same batch size, got {x.shape[0]} and {context.shape[0]}")
