"""The plain twin of kernels/block_mask.py's create_block_mask: block lists from a dense mask, tile by tile.

A (query block, key block) tile of the dense (B, H, Nq, Nk) mask is
    empty    no pair visible: the kernels never load that key block for that query block
    partial  some pair visible: loaded, the mask_mod applied
    full     every pair visible and inside both sequences (a tile hanging past Nq or Nk is at
             most partial): loaded, no mask at all
The lists the kernels read are, per query block, the count of partial key blocks then their
indices in increasing order, padded with 0; the same for full ones; and the transposes
(per key block, its query blocks) for the dK/dV kernel. Loops, no tricks: this is what
kernels.block_mask builds with a tile-per-program kernel and a stable sort.
"""
from dataclasses import dataclass

import torch

from .mods import dense_mask

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class PlainBlockMask:
    kv: torch.Tensor  # (2, B, H, num_q_blocks, 1 + num_kv_blocks) int32: [partial, full] lists per query block
    q: torch.Tensor  # (2, B, H, num_kv_blocks, 1 + num_q_blocks) int32: the transposes
    seq_lengths: tuple
    block_size: tuple


def tile_kinds(mask, block_m, block_n):
    """(B, H, num_q_blocks, num_kv_blocks) int8: EMPTY, PARTIAL or FULL for each tile of a (B, H, Nq, Nk) mask."""
    batch, heads, n_q, n_k = mask.shape
    num_q, num_kv = -(-n_q // block_m), -(-n_k // block_n)
    kinds = torch.zeros(batch, heads, num_q, num_kv, dtype=torch.int8)
    for b in range(batch):
        for h in range(heads):
            for i in range(num_q):
                for j in range(num_kv):
                    tile = mask[b, h, i * block_m:(i + 1) * block_m, j * block_n:(j + 1) * block_n]
                    whole = tile.shape == (block_m, block_n)  # the last tile of a ragged length is cut short
                    if tile.all() and whole:
                        kinds[b, h, i, j] = FULL
                    elif tile.any():
                        kinds[b, h, i, j] = PARTIAL
    return kinds


def block_lists(kinds):
    """(2, B, H, rows, 1 + cols) int32 from (B, H, rows, cols) tile kinds: count, then indices, for PARTIAL and FULL."""
    batch, heads, rows, cols = kinds.shape
    lists = torch.zeros(2, batch, heads, rows, 1 + cols, dtype=torch.int32)
    for slot, kind in enumerate((PARTIAL, FULL)):
        for b in range(batch):
            for h in range(heads):
                for r in range(rows):
                    columns = [c for c in range(cols) if kinds[b, h, r, c] == kind]
                    lists[slot, b, h, r, 0] = len(columns)
                    lists[slot, b, h, r, 1:1 + len(columns)] = torch.tensor(columns, dtype=torch.int32)
    return lists


def block_mask_from_dense(mask, block_size=128):
    """A PlainBlockMask from a (B, H, Nq, Nk) bool mask, True = visible."""
    block_m, block_n = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    kinds = tile_kinds(mask.cpu(), block_m, block_n)
    return PlainBlockMask(kv=block_lists(kinds), q=block_lists(kinds.transpose(-1, -2)),
                          seq_lengths=(mask.shape[2], mask.shape[3]), block_size=(block_m, block_n))


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128):
    """create_block_mask's twin: mask_mod is a reference.mods function; B or H None (or 1) shares the mask."""
    return block_mask_from_dense(dense_mask(mask_mod, B or 1, H or 1, Q_LEN, KV_LEN, device), BLOCK_SIZE)
