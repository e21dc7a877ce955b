"""Any attention pattern: score and mask modifications written in Triton, and block masks that skip work.

FlexAttention's idea, in plain Triton: a user writes the variant as small
functions applied to each score tile inside the flash kernels' forward and
backward, and the kernels compile them in as compile-time arguments (a call
without them compiles to the plain kernels):

    score_mod(score, b, h, q_idx, kv_idx, args) -> score     the scaled score, in natural units
    mask_mod(b, h, q_idx, kv_idx, args) -> bool              True: query q_idx may see key kv_idx

score is a tile, b and h are the batch and query-head indices, q_idx and
kv_idx index tiles that broadcast to it (positions within the sequence), and
args is a tuple of the tensors and numbers the mod reads (document ids, a
bias table, a prefix length), passed to the kernel alongside it. A
ScoreMod's backward is a second function,

    score_mod_bwd(grad, score, b, h, q_idx, kv_idx, args, grad_args, ACCUMULATE) -> grad w.r.t. score

which, when ACCUMULATE, may also add the gradients of tensors it reads into
grad_args (fp32 buffers, one per tensor of args that requires grad: atomics
there, so those sums are not bitwise reproducible).

A mask_mod alone must still visit every key block, since it may hide any key.
A BlockMask says which it hides wholly: `create_block_mask` evaluates the
mask_mod on the device, tile by tile, and keeps per query block the key
blocks that some (query, key) pair sees ("partial": the kernel applies the
mask_mod) and those every pair sees ("full": no mask at all), plus the
transposed lists for the dK/dV kernel. Key blocks in neither list are never
loaded. It is built once and reused across layers and calls.

Layout (kernels read it as such): `kv` is int32 (2, B, H, num_q_blocks,
1 + num_kv_blocks): kv[0] the partial lists, kv[1] the full ones; in each
row, the count, then that many block indices. `q` is the transpose, (2, B, H,
num_kv_blocks, 1 + num_q_blocks). B or H of 1 broadcast. FlexAttention's
names (kv_num_blocks, kv_indices, full_kv_num_blocks, ...) are views of them.
`reference/block_mask.py` builds the same lists in plain PyTorch.
"""
import dataclasses

import torch
import triton
import triton.language as tl

from . import runtime
from .runtime import check_runnable

DEFAULT_BLOCK_SIZE = 128  # FlexAttention's: the kernels' tiles fit inside it on every chip


# ----------------------------------------------------------------------------
# The mods: a jit function and what it reads
# ----------------------------------------------------------------------------
# The parameters each kind of mod must take, in order (their names are the user's).
MOD_PARAMETERS = {"score_mod": "score, b, h, q_idx, kv_idx, args",
                  "mask_mod": "b, h, q_idx, kv_idx, args",
                  "score_mod's bwd": "grad, score, b, h, q_idx, kv_idx, args, grad_args, ACCUMULATE: tl.constexpr"}


def _check_jit(fn, name):
    """fn is a @triton.jit function taking the parameters a `name` takes: a clear error here, not in the kernel."""
    if not isinstance(fn, triton.runtime.jit.JITFunction) and not hasattr(fn, "fn"):
        raise TypeError(f"{name} must be a @triton.jit function, got {type(fn).__name__}")
    expected = MOD_PARAMETERS[name]
    arg_names = list(getattr(fn, "arg_names", []))
    if len(arg_names) != expected.count(",") + 1:
        raise TypeError(f"{name} must take ({expected}); {getattr(fn, '__name__', fn)} takes "
                        f"({', '.join(arg_names)})")


@dataclasses.dataclass(frozen=True, eq=False)
class ScoreMod:
    """A score modification: fn(score, b, h, q_idx, kv_idx, args) and its derivative bwd (None: no gradient).

    args: the tensors and numbers fn reads, in order. A tensor of args that
    requires grad gets one: bwd adds into grad_args[i] for the i-th such tensor.
    """
    fn: object
    args: tuple = ()
    bwd: object = None

    def __post_init__(self):
        _check_jit(self.fn, "score_mod")
        if self.bwd is not None:
            _check_jit(self.bwd, "score_mod's bwd")
        object.__setattr__(self, "args", tuple(self.args))

    @property
    def differentiable(self):
        """The tensors of args that require grad, in order: grad_args follows this order."""
        return tuple(a for a in self.args if isinstance(a, torch.Tensor) and a.requires_grad)


@dataclasses.dataclass(frozen=True, eq=False)
class MaskMod:
    """A mask: fn(b, h, q_idx, kv_idx, args) -> bool tile, True where the query sees the key."""
    fn: object
    args: tuple = ()

    def __post_init__(self):
        _check_jit(self.fn, "mask_mod")
        object.__setattr__(self, "args", tuple(self.args))


def check_mod_args(args, device, name):
    """A mod's args: tensors on the kernels' device (runnable there), ints, floats and bools."""
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            if arg.device != device:
                raise ValueError(f"{name}'s args[{i}] is on {arg.device} but the inputs are on {device}")
            if device.type != "cuda" and not runtime.INTERPRET:
                check_runnable(arg, f"{name}'s args[{i}]")
        elif not isinstance(arg, (int, float, bool)):
            raise TypeError(f"{name}'s args[{i}] must be a tensor, an int, a float or a bool, got {type(arg).__name__}")


def check_mod_shapes(mod, batch, heads, n_q, n_k):
    """A mod that knows its tensors' shapes (kernels/mods.py's) checks them against the call's sizes."""
    check = getattr(mod, "check", None)
    if check is not None:
        check(batch, heads, n_q, n_k)


def as_score_mod(score_mod):
    """A ScoreMod from a ScoreMod or a bare @triton.jit function (no args, no derivative)."""
    return score_mod if score_mod is None or isinstance(score_mod, ScoreMod) else ScoreMod(score_mod)


def as_mask_mod(mask_mod):
    return mask_mod if mask_mod is None or isinstance(mask_mod, MaskMod) else MaskMod(mask_mod)


# ----------------------------------------------------------------------------
# Block masks
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class BlockMask:
    """Which key blocks each query block visits, partly or wholly; and the transpose for the backward."""
    kv: torch.Tensor  # (2, B, H, num_q_blocks, 1 + num_kv_blocks) int32
    q: torch.Tensor  # (2, B, H, num_kv_blocks, 1 + num_q_blocks) int32
    seq_lengths: tuple  # (Nq, Nk) it was built for
    block_size: tuple  # (BLOCK_M, BLOCK_N): rows and keys per block
    mask_mod: MaskMod | None

    # FlexAttention's names
    @property
    def kv_num_blocks(self):
        return self.kv[0, ..., 0]

    @property
    def kv_indices(self):
        return self.kv[0, ..., 1:]

    @property
    def full_kv_num_blocks(self):
        return self.kv[1, ..., 0]

    @property
    def full_kv_indices(self):
        return self.kv[1, ..., 1:]

    @property
    def q_num_blocks(self):
        return self.q[0, ..., 0]

    @property
    def full_q_num_blocks(self):
        return self.q[1, ..., 0]

    def sparsity(self) -> float:
        """The fraction of (query block, key block) tiles the kernels never load, as FlexAttention reports it."""
        visited = (self.kv[0, ..., 0].sum() + self.kv[1, ..., 0].sum()).item()
        num_q, num_kv = self.kv.shape[3], self.kv.shape[4] - 1
        return 1.0 - visited / (self.kv.shape[1] * self.kv.shape[2] * num_q * num_kv)

    def __repr__(self):
        b, h, num_q, num_kv = self.kv.shape[1], self.kv.shape[2], self.kv.shape[3], self.kv.shape[4] - 1
        return (f"BlockMask(B={b}, H={h}, seq_lengths={self.seq_lengths}, block_size={self.block_size}, "
                f"{num_q}x{num_kv} blocks)")


@triton.jit
def _classify_blocks(KIND, NUM_HEADS, N_Q, N_K, NUM_Q_BLOCKS, NUM_KV_BLOCKS, mask_args, MASK_MOD: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: one (query block, key block) tile of one (b, h). KIND = 0 empty, 1 partial, 2 full.

    The mask_mod is evaluated on every pair of the tile: a block is full when every pair is visible
    and inside both sequences (the kernels skip all masks there), empty when no pair is.
    """
    row = tl.program_id(0)
    col = tl.program_id(1)
    bh = tl.program_id(2)
    off_b = (bh // NUM_HEADS).to(tl.int64)
    off_h = (bh % NUM_HEADS).to(tl.int64)
    q_idx = row * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    kv_idx = col * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    inside = (q_idx < N_Q) & (kv_idx < N_K)
    # Indices clamped to the sequences, as the attention kernels give them (kernels/tiles.py: _scores).
    visible = MASK_MOD(off_b, off_h, tl.minimum(q_idx, N_Q - 1), tl.minimum(kv_idx, N_K - 1), mask_args) & inside
    total = tl.sum(tl.sum(visible.to(tl.int32), axis=1), axis=0)
    kind = tl.where(total == 0, 0, tl.where(total == BLOCK_M * BLOCK_N, 2, 1))
    tl.store(KIND + (bh.to(tl.int64) * NUM_Q_BLOCKS + row) * NUM_KV_BLOCKS + col, kind.to(tl.int8))


def _lists(kinds):
    """(2, ..., rows, 1 + cols) int32 block lists from a (..., rows, cols) tile classification (1 partial, 2 full).

    Per row: how many blocks of each kind, then their column indices in order (padding after them is 0).
    A stable sort puts each kind's columns first; no host reads.
    """
    cols = kinds.shape[-1]
    out = []
    for kind in (1, 2):
        hit = kinds == kind
        order = torch.argsort((~hit).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # hit columns first
        count = hit.sum(-1, keepdim=True).to(torch.int32)
        indices = torch.where(torch.arange(cols, device=kinds.device) < count, order, 0)
        out.append(torch.cat([count, indices], dim=-1))
    return torch.stack(out)


def block_mask_from_kinds(kinds, seq_lengths, block_size, mask_mod=None):
    """A BlockMask from a (B, H, num_q_blocks, num_kv_blocks) tile classification: 0 empty, 1 partial, 2 full."""
    return BlockMask(kv=_lists(kinds), q=_lists(kinds.transpose(-1, -2)), seq_lengths=tuple(seq_lengths),
                     block_size=tuple(block_size), mask_mod=mask_mod)


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device="cuda", BLOCK_SIZE=DEFAULT_BLOCK_SIZE):
    """Build the BlockMask of `mask_mod` (a MaskMod or a @triton.jit function) on `device`: FlexAttention's API.

    B or H None (or 1) makes one mask for every batch entry or head. BLOCK_SIZE: an int, or
    (rows, keys) per block; the kernels' tiles must fit inside a block (128, the default, fits
    every chip's tiles). Nothing is read on the host.
    """
    mask_mod = as_mask_mod(mask_mod)
    if mask_mod is None:
        raise TypeError("mask_mod must be a MaskMod or a @triton.jit function, got None")
    check_mod_shapes(mask_mod, B or 1, H or 1, Q_LEN, KV_LEN)
    block_m, block_n = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else tuple(BLOCK_SIZE)
    for name, value in (("BLOCK_SIZE", block_m), ("BLOCK_SIZE", block_n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (or a pair of them), got {BLOCK_SIZE!r}")
    batch, heads = B or 1, H or 1
    for name, value in (("B", batch), ("H", heads), ("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name in "BH" else 0):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    device = torch.device(device)
    check_mod_args(mask_mod.args, device, "mask_mod")
    num_q, num_kv = -(-Q_LEN // block_m), -(-KV_LEN // block_n)
    kinds = torch.empty((batch, heads, num_q, num_kv), dtype=torch.int8, device=device)
    if kinds.numel():
        with runtime.on_device(device):
            _classify_blocks[(num_q, num_kv, batch * heads)](kinds, heads, Q_LEN, KV_LEN, num_q, num_kv,
                                                             mask_mod.args, MASK_MOD=mask_mod.fn, BLOCK_M=block_m,
                                                             BLOCK_N=block_n)
    return block_mask_from_kinds(kinds, (Q_LEN, KV_LEN), (block_m, block_n), mask_mod)


def block_mask_from_dense(mask, block_size=DEFAULT_BLOCK_SIZE):
    """The BlockMask of a dense bool mask (B or 1, H or 1, Nq, Nk), True = visible: tiles all False are skipped.

    Built with tensor reductions on the mask's device; no host reads.
    """
    block_m, block_n = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    n_q, n_k = mask.shape[-2], mask.shape[-1]
    num_q, num_kv = -(-n_q // block_m), -(-n_k // block_n)
    padded = torch.zeros((*mask.shape[:2], num_q * block_m, num_kv * block_n), dtype=torch.bool, device=mask.device)
    padded[..., :n_q, :n_k] = mask
    # (B, H, num_q * bm, num_kv * bn) -> (B, H, num_q, bm, num_kv, bn): per tile, how many pairs are visible
    tiles = padded.view(*mask.shape[:2], num_q, block_m, num_kv, block_n).sum(dim=(3, 5))
    kinds = torch.where(tiles == 0, 0, torch.where(tiles == block_m * block_n, 2, 1)).to(torch.int8)
    return block_mask_from_kinds(kinds, (n_q, n_k), (block_m, block_n))


# ----------------------------------------------------------------------------
# What a call's mods add to a kernel launch
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Mods:
    """A call's score_mod, mask_mod and block_mask, as the flash launchers pass them to the kernels."""
    score_mod: ScoreMod | None = None
    mask_mod: MaskMod | None = None
    block_mask: BlockMask | None = None

    def __bool__(self):
        return any(x is not None for x in (self.score_mod, self.mask_mod, self.block_mask))

    def kernel_arguments(self, placeholder, transposed=False, backward=False):
        """(block-mask tensor, its 4 strides, score_args, mask_args, constexprs) for one kernel.

        transposed: the dK/dV kernel's lists (per key block). backward: the constexprs include the
        score_mod's derivative. placeholder: any tensor, for a block mask that is not there.
        """
        lists, block = placeholder, (0, 0)
        strides = (0, 0, 0, 0)
        if self.block_mask is not None:
            lists = self.block_mask.q if transposed else self.block_mask.kv
            # (kind, B, H, row): a batch or head dimension of 1 is shared (stride 0).
            strides = tuple(0 if lists.shape[d] == 1 and d in (1, 2) else lists.stride(d) for d in range(4))
            block = self.block_mask.block_size
        constexprs = dict(SCORE_MOD=self.score_mod.fn if self.score_mod is not None else None,
                          MASK_MOD=self.mask_mod.fn if self.mask_mod is not None else None,
                          MASK_BLOCK_M=block[0], MASK_BLOCK_N=block[1])
        if backward:
            constexprs["SCORE_MOD_BWD"] = self.score_mod.bwd if self.score_mod is not None else None
        return (lists, strides, self.score_mod.args if self.score_mod is not None else (),
                self.mask_mod.args if self.mask_mod is not None else (), constexprs)


NO_MODS = Mods()
