"""A KV cache for one attention layer and a batch of sequences: contiguous or paged.

Generation runs the model once on the prompts (the prefill), then once per
new token (a decode step). Without a cache every step recomputes K and V
for every earlier token; with one, each step computes K and V for its new
tokens only, appends them, and attends to everything cached.

Two layouts (see reference/decode.py for the indexing):

    contiguous  k, v: (batch, Hkv, capacity, D), every sequence reserves capacity rows
    paged       a pool of blocks of block_size rows, stored as vLLM does,
                (num_blocks, block_size, Hkv, D), and read through the permuted view
                (num_blocks, Hkv, block_size, D); block_table (batch, max_blocks) maps
                a sequence's logical blocks to pool blocks, taken from a free list as
                the sequence grows, so memory follows the tokens actually held

Lengths are kept twice: `seqlens`, a (batch,) int32 tensor on the cache's
device that the attention functions read, and `lengths`, a list of ints on
the host, so that positions, capacity checks and block allocation never
wait on the device.
"""
import torch

from .decode import append_kv


class KVCache:
    """K and V of one layer for `batch` sequences of up to `capacity` tokens each.

    block_size=None gives the contiguous layout; an int gives the paged one,
    with a pool of num_blocks blocks (default: enough for every sequence at
    full capacity).
    """

    def __init__(self, batch, num_kv_heads, head_dim, capacity, *, dtype=None, device=None, block_size=None,
                 num_blocks=None):
        for name, n in (("batch", batch), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("capacity", capacity)):
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be an int >= 1, got {n!r}")
        self.batch, self.capacity = batch, capacity
        self.block_size = block_size
        self.lengths = [0] * batch
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        if block_size is None:
            self.k, self.v = self._new_storage((batch, num_kv_heads, capacity, head_dim), dtype, device)
            self.block_table = None
            return
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be None or an int >= 1, got {block_size!r}")
        blocks_per_seq = -(-capacity // block_size)
        num_blocks = batch * blocks_per_seq if num_blocks is None else num_blocks
        # vLLM's pool layout, (num_blocks, block_size, Hkv, D); the attention functions read the
        # (num_blocks, Hkv, block_size, D) view of it through its strides, without a copy.
        self.k_pool, self.v_pool = self._new_storage((num_blocks, block_size, num_kv_heads, head_dim), dtype, device)
        self.k, self.v = self.k_pool.permute(0, 2, 1, 3), self.v_pool.permute(0, 2, 1, 3)
        self.free_blocks = list(range(num_blocks))
        self.blocks = [[] for _ in range(batch)]  # each sequence's pool blocks, in logical order
        self.block_table = torch.full((batch, blocks_per_seq), -1, dtype=torch.int32, device=device)

    def _new_storage(self, shape, dtype, device):
        """The K and V tensors (zeros) of one layout: two separate tensors here; a subclass may share one."""
        return (torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device))

    @property
    def is_empty(self) -> bool:
        return not any(self.lengths)

    def positions(self, num_tokens: int) -> torch.Tensor:
        """(batch, num_tokens) positions of the next tokens: each sequence continues from its own length."""
        start = torch.tensor(self.lengths, dtype=torch.int64, device=self.seqlens.device)
        return start[:, None] + torch.arange(num_tokens, device=self.seqlens.device)

    def _reserve(self, new_lengths):
        """Give every sequence the pool blocks its new length needs, from the free list."""
        changed = False
        for b, n in enumerate(new_lengths):
            while len(self.blocks[b]) * self.block_size < n:
                if not self.free_blocks:
                    raise ValueError(f"the pool's {self.k_pool.shape[0]} blocks are all in use: "
                                     f"sequence {b} needs more for {n} tokens")
                self.blocks[b].append(self.free_blocks.pop(0))
                changed = True
        if changed:
            self._write_table()

    def _write_table(self):
        """The block table from the host's lists; -1 marks a logical block not allocated (never read)."""
        table = [row + [-1] * (self.block_table.shape[1] - len(row)) for row in self.blocks]
        self.block_table = torch.tensor(table, dtype=torch.int32, device=self.seqlens.device)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v (batch, Hkv, num_tokens, D) after each sequence's cached tokens."""
        new_lengths = self._make_room(k.shape[2])
        self.seqlens = append_kv(self.k, self.v, k, v, self.seqlens, self.block_table)
        self.lengths = new_lengths

    def _make_room(self, num_tokens):
        """Check the capacity for num_tokens more per sequence and reserve their blocks; returns the new lengths."""
        new_lengths = [n + num_tokens for n in self.lengths]
        if max(new_lengths) > self.capacity:
            raise ValueError(f"the cache holds up to {self.capacity} tokens per sequence: appending {num_tokens} "
                             f"to {max(self.lengths)} would pass it")
        if self.block_table is not None:
            self._reserve(new_lengths)
        return new_lengths

    def truncate(self, lengths) -> None:
        """Keep only the first lengths[b] tokens of sequence b (ragged prompts after a padded prefill)."""
        lengths = [int(n) for n in lengths]
        if len(lengths) != self.batch or any(not 0 <= n <= m for n, m in zip(lengths, self.lengths)):
            raise ValueError(f"lengths must hold {self.batch} values, each between 0 and the cached length "
                             f"{self.lengths}, got {lengths}")
        self.lengths = lengths
        self.seqlens = torch.tensor(lengths, dtype=torch.int32, device=self.seqlens.device)
        if self.block_table is not None:
            for b, n in enumerate(lengths):
                keep = -(-n // self.block_size)
                self.free_blocks += self.blocks[b][keep:]
                self.blocks[b] = self.blocks[b][:keep]
            self._write_table()
