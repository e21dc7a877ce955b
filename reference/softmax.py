"""Softmax three ways, each one step closer to what a kernel can do in one pass.

1. naive:  exp(x) / sum(exp(x)). Overflows: exp(89) is already inf in fp32.
2. safe:   subtract the row max first. softmax(x) = softmax(x - c) for any c,
           and with c = max(x) every exponent is <= 0, so nothing overflows.
           Costs two passes over the row before the write (max, then sum).
3. online: one pass keeps a running max m and running normaliser l. When a
           new block raises the max from m_old to m_new, every term summed so
           far was exp(x - m_old); multiplying l by exp(m_old - m_new) turns
           each into exp(x - m_new). So after the last block l is exactly
           sum(exp(x - max(x))), the safe normaliser, computed in one pass.
           A second pass writes exp(x - m) / l.

The online form is the one that lets flash attention walk key blocks without
ever seeing a whole row of scores.
"""
import torch


def naive_softmax(x: torch.Tensor) -> torch.Tensor:
    """exp(x) / sum(exp(x)) over the last dimension. Overflows for large logits."""
    numerator = torch.exp(x)
    return numerator / numerator.sum(dim=-1, keepdim=True)


def safe_softmax(x: torch.Tensor) -> torch.Tensor:
    """Max-subtracted softmax over the last dimension: every exponent is <= 0."""
    m = x.max(dim=-1, keepdim=True).values
    numerator = torch.exp(x - m)
    return numerator / numerator.sum(dim=-1, keepdim=True)


def online_softmax(x: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Softmax over the last dimension from a single pass of running max and normaliser.

    The row is read block by block, as the Triton kernel reads it; block_size=1
    gives the textbook element-by-element recurrence.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n = x.shape[-1]
    m = torch.full(x.shape[:-1] + (1,), float("-inf"), dtype=x.dtype, device=x.device)
    l = torch.zeros_like(m)
    # Pass 1: running max m and normaliser l.
    for start in range(0, n, block_size):
        block = x[..., start:start + block_size]
        m_new = torch.maximum(m, block.max(dim=-1, keepdim=True).values)
        # Rescale what was summed under the old max, then add this block's terms.
        l = l * torch.exp(m - m_new) + torch.exp(block - m_new).sum(dim=-1, keepdim=True)
        m = m_new
    # Pass 2: normalise.
    return torch.exp(x - m) / l
