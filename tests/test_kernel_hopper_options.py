"""The forward's Hopper options, descriptor (TMA) loads and warp specialization, forced and held to float64.

On an H100 the config chooser may pick them (kernels/configs.py; tested in
tests/test_kernel_launch_configs.py) and tests/test_kernel_gpu_compile.py
proves they compile for sm_90. Here each is forced with only_config. Under the
interpreter a descriptor load is a load over the descriptor's bounds, so these
tests prove what the kernel asks of the descriptors (which rows and columns they
cover, per batch, head and packed sequence) and that the keys they zero-fill stay
masked; warp specialization runs its single masked key loop. The copies
themselves, and the speed, need a GPU (on one these tests run the real thing).
"""
import math

import pytest
import torch
import triton

from kernels import flash_attention, flash_attention_varlen
from kernels.configs import only_config
from kernels.flash_attention import _descriptor_loads_allowed, _flash_fwd
from kernels.runtime import INTERPRET
from reference import naive_attention_varlen
from tests.cases import HOPPER_CASES, AttentionCase, dtype_params, params
from tests.helpers import assert_close_to_reference
from tests.test_kernel_flash_forward import check_forward

# The interpreter's tile shape (kernels/configs.py), with each Hopper option switched on.
POINTERS = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)
TMA = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "USE_TMA": True}, num_warps=4, num_stages=1)
TMA_WS = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "USE_TMA": True, "WARP_SPECIALIZE": True}, num_warps=4,
                       num_stages=1)
HOPPER_CONFIGS = [pytest.param(TMA, id="tma"), pytest.param(TMA_WS, id="tma-ws")]


@pytest.fixture
def descriptor_loads(monkeypatch):
    """A list that grows by one per descriptor load the interpreter runs (None on a GPU, where none is seen)."""
    if not INTERPRET:
        return None
    from triton.runtime import interpreter

    loads = []
    original = interpreter.InterpreterBuilder.create_descriptor_load

    def counted(self, *args, **kwargs):
        loads.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_descriptor_load", counted)
    return loads


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", params(HOPPER_CASES))
@pytest.mark.parametrize("config", HOPPER_CONFIGS)
def test_forced_hopper_config_matches_references(config, case, dtype, device, descriptor_loads):
    """Output and lse against float64, SDPA and PyTorch in the same dtype; rows with no key give 0 and -inf."""
    with only_config("fwd", config) as tuner:
        check_forward(case, dtype, device)
        assert tuner.last_config is config
    if descriptor_loads is not None:
        assert descriptor_loads, "no descriptor load ran: the kernel took the pointer path"


@pytest.mark.skipif(not INTERPRET, reason="bitwise equality of the two load paths is an interpreter property")
def test_descriptor_loads_give_the_pointer_paths_bits(descriptor_loads):
    """Same tiles, same loops: a descriptor load must return exactly what the masked pointer load does."""
    q, k, v = HOPPER_CASES[0].make_inputs(torch.bfloat16, "cpu")
    outputs = {}
    for config in (POINTERS, TMA):
        with only_config("fwd", config):
            outputs[config.kwargs.get("USE_TMA", False)] = _flash_fwd(q, k, v, False, 0.125)
    assert descriptor_loads, "no descriptor load ran"
    for tma, pointers, name in zip(outputs[True], outputs[False], ("o", "lse")):
        assert torch.equal(tma, pointers), f"{name}: the descriptor path differs from the pointer path"


@pytest.mark.parametrize("dtype", dtype_params())
def test_packed_sequences_read_only_their_own_rows(dtype, device, descriptor_loads):
    """A descriptor per sequence, bounded by its own length: the next sequence's rows are never read.

    Sequence 1 has 20 keys and no query, all NaN: sequence 0's last key block
    (keys 32..63 of its 33) covers them, and any of them read would turn its
    output to NaN (p = 0 times NaN). Sequence 2 starts at row 53 of k: a start
    that is a multiple of no block.
    """
    lengths_q, lengths_k, h_q, h_kv, head_dim = [40, 0, 97], [33, 20, 70], 4, 2, 48
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device=device)
                  for n in (lengths_q, lengths_k))
    q = torch.randn(sum(lengths_q), h_q, head_dim, dtype=dtype, device=device)
    k, v = (torch.randn(sum(lengths_k), h_kv, head_dim, dtype=dtype, device=device) for _ in range(2))
    k[33:53], v[33:53] = float("nan"), float("nan")
    varlen = (cu_q.tolist(), cu_k.tolist())
    for causal in (False, True):
        with only_config("fwd", TMA):
            o = flash_attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=causal)
        o64 = naive_attention_varlen(q, k, v, *varlen, causal, None, torch.float64)
        assert_close_to_reference(o, o64, naive_attention_varlen(q, k, v, *varlen, causal, None, dtype),
                                  name=f"o ({'causal' if causal else 'full'})")
    if descriptor_loads is not None:
        assert descriptor_loads, "no descriptor load ran"


def test_forced_warp_specialization_refuses_packed_sequences(device):
    q = torch.randn(10, 2, 16, device=device)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    with only_config("fwd", TMA_WS), pytest.raises(ValueError, match="warp-specialized.*packed"):
        flash_attention_varlen(q, q, q, cu, cu, 6, 6)


def test_forced_descriptor_config_refuses_a_misaligned_view(device):
    """A forced config is not pruned: on a layout TMA cannot read it fails clearly, before launching."""
    q, k, v = (t[..., :40] for t in AttentionCase(1, 2, 2, 33, 33, 41, False).make_inputs(torch.float16, device))
    assert not _descriptor_loads_allowed(q, k, v)  # rows 41 halves = 82 bytes apart
    with only_config("fwd", TMA), pytest.raises(ValueError, match="tensor descriptors"):
        flash_attention(q, k, v)


@pytest.mark.parametrize("layout, allowed", [
    ("contiguous", True),
    ("heads-transposed view", True),   # (B, N, H, D) -> (B, H, N, D): strides move, stay 16-byte multiples
    ("head dim 4 in fp16", False),     # rows 8 bytes apart
    ("slice of the head dim", False),  # rows 82 bytes apart
    ("start 2 bytes in", False),       # the base pointer is misaligned
    ("transposed last dims", False),   # last stride is not 1
])
def test_which_layouts_allow_descriptor_loads(layout, allowed, device):
    base = torch.randn(2, 24, 3, 41, dtype=torch.float16, device=device)
    t = {"contiguous": base[..., :40].contiguous(),
         "heads-transposed view": base[..., :40].contiguous().transpose(1, 2),
         "head dim 4 in fp16": base[..., :4].contiguous(),
         "slice of the head dim": base[..., :40],
         "start 2 bytes in": base[..., :40].contiguous().flatten()[1:1 + 2 * 24 * 3 * 32].view(2, 24, 3, 32),
         "transposed last dims": base[..., :40].contiguous().transpose(-1, -2)}[layout]
    assert _descriptor_loads_allowed(t, t, t) == allowed, layout


@pytest.mark.skipif(not INTERPRET, reason="on a GPU the chooser may pick descriptor loads")
def test_default_config_takes_the_pointer_path(device, descriptor_loads):
    """The descriptor path is an option the chooser may pick on Hopper: the interpreter's one config never takes it."""
    q, k, v = HOPPER_CASES[0].make_inputs(torch.float32, device)
    flash_attention(q, k, v, sm_scale=1 / math.sqrt(q.shape[-1]))
    assert not descriptor_loads, "the default config used descriptor loads under the interpreter"
