"""The host path: no host-device sync in any serving call, and the cheap eager paths taken when they may be.

Every call below runs inside tests/sync_guard.py's no_host_sync(), which
fails on any value read back, data-dependent size or device-to-host copy
(on the CPU as on a GPU). Speed itself is shown by `python -m bench --suite
overhead`, never by a timed test; here the tests check which path a call
takes: in eager mode flash_attention calls the launcher itself when nothing
is differentiated, a plain autograd.Function when something is, and the
custom op only under torch.compile (or for tensor subclasses).
"""
import importlib

import pytest
import torch

from kernels import append_kv, decode_attention, flash_attention, flash_attention_varlen, paged_attention
from tests.cases import PagedCase
from tests.sync_guard import HostSyncError, no_host_sync

fa = importlib.import_module("kernels.flash_attention")
ops = importlib.import_module("kernels.ops")


# ----------------------------------------------------------------------------
# The guard catches what it should
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("read", [
    lambda t: t.tolist(), lambda t: t.sum().item(), lambda t: bool(t[0]), lambda t: int(t[1]),
    lambda t: [0, 1, 2][t[1]], lambda t: t.nonzero(), lambda t: t[t > 1], lambda t: torch.equal(t, t),
    lambda t: torch.ops.aten._local_scalar_dense(t[0]), lambda t: t.unique(),
    lambda t: torch.empty(2, device="meta").cpu(),  # a copy from another device to the host
], ids=["tolist", "item", "bool", "int", "index", "nonzero", "boolean-mask", "equal", "local-scalar-dense", "unique",
        "device-to-host"])
def test_the_guard_catches_a_sync(read):
    t = torch.arange(4)
    with pytest.raises(HostSyncError, match="host-device sync inside no_host_sync"):
        with no_host_sync():
            read(t)
    assert t.tolist() == [0, 1, 2, 3], "the guard puts Tensor's methods back"


def test_the_guard_lets_device_work_through():
    t = torch.arange(6.0)
    with no_host_sync():
        u = torch.where(t > 2, t, 0).cumsum(0) + t.to(torch.float64).cpu()[None]  # CPU to CPU: no sync
    assert u.shape == (1, 6)


# ----------------------------------------------------------------------------
# No sync in any serving call
# ----------------------------------------------------------------------------
def test_flash_attention_forward_and_backward_do_not_sync(device):
    q = torch.randn(1, 4, 20, 16, device=device, requires_grad=True)
    k, v = (torch.randn(1, 2, 20, 16, device=device, requires_grad=True) for _ in range(2))
    sinks = torch.randn(4, device=device, requires_grad=True)
    with no_host_sync():
        with torch.no_grad():
            flash_attention(q, k, v, causal=True, window_size=(7, 0))
        o, lse = flash_attention(q, k, v, causal=True, sinks=sinks, return_lse=True)
        (o.sum() + lse.sum()).backward()
    assert q.grad is not None and sinks.grad is not None


def test_flash_attention_varlen_does_not_sync(device):
    lengths = [5, 0, 12]
    cu = torch.tensor([0, 5, 5, 17], dtype=torch.int32, device=device)
    q = torch.randn(17, 4, 16, device=device, requires_grad=True)
    k, v = (torch.randn(17, 2, 16, device=device, requires_grad=True) for _ in range(2))
    with no_host_sync():
        o = flash_attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
        o.sum().backward()
    assert k.grad is not None
    with pytest.raises(HostSyncError):  # validate=True reads the offsets: the sync it documents
        with no_host_sync():
            flash_attention_varlen(q, k, v, cu, cu, 12, 12, validate=True)


DECODE = PagedCase(seqlens=(5, 40), h_q=4, h_kv=2, new=1, head_dim=16, causal=True, num_splits=None)
DECODE_PAGED = PagedCase(seqlens=(5, 40), h_q=4, h_kv=2, new=1, head_dim=16, causal=True, num_splits=None,
                         block_size=4, vllm_pool=True)
CHUNKED = PagedCase(seqlens=(5, 40, 9), h_q=4, h_kv=2, new=(1, 3, 0), head_dim=16, causal=True, num_splits=None,
                    block_size=4)


@pytest.mark.parametrize("case", [DECODE, DECODE_PAGED], ids=["contiguous", "paged"])
def test_a_decode_step_does_not_sync(case, device):
    """append_kv then decode_attention, dense: one generation step."""
    inputs = case.make_inputs(torch.float32, device)
    k_cache, v_cache, table = inputs["k_cache"], inputs["v_cache"], inputs["block_table"]
    lengths = inputs["seqused_k"] - 1  # the step's token is appended first
    k_new, v_new = torch.randn(2, 2, case.h_kv, 1, case.head_dim, device=device)
    with no_host_sync(), torch.no_grad():
        lengths = append_kv(k_cache, v_cache, k_new, v_new, lengths, table)
        o = decode_attention(inputs["q"], k_cache, v_cache, lengths, table)
    assert o.shape == inputs["q"].shape and not o.isnan().any()


def test_a_chunked_prefill_step_does_not_sync(device):
    """append_kv then paged_attention, both packed: 1, 3 and 0 new tokens over a paged cache."""
    inputs = CHUNKED.make_inputs(torch.float32, device)
    k_cache, v_cache, table, cu = inputs["k_cache"], inputs["v_cache"], inputs["block_table"], inputs["cu_seqlens_q"]
    lengths = inputs["seqused_k"] - torch.tensor(CHUNKED.new, dtype=torch.int32, device=device)
    k_new, v_new = torch.randn(2, sum(CHUNKED.new), CHUNKED.h_kv, CHUNKED.head_dim, device=device)
    with no_host_sync(), torch.no_grad():
        lengths = append_kv(k_cache, v_cache, k_new, v_new, lengths, table, cu_seqlens_new=cu)
        o = paged_attention(inputs["q"], k_cache, v_cache, lengths, table, cu_seqlens_q=cu,
                            max_seqlen_q=max(CHUNKED.new))
    assert o.shape == inputs["q"].shape and not o.isnan().any()


def test_append_kv_validate_is_the_only_sync(device):
    k = v = torch.zeros(2, 1, 8, 4, device=device)
    new = torch.zeros(2, 1, 3, 4, device=device)
    with pytest.raises(HostSyncError):
        with no_host_sync():
            append_kv(k, v, new, new, torch.tensor([0, 2], device=device), validate=True)


# ----------------------------------------------------------------------------
# Which path a call takes
# ----------------------------------------------------------------------------
class Count:
    """Stands in for a callable and counts its calls, passing them through."""

    def __init__(self, target):
        self.target, self.calls = target, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.target(*args, **kwargs)


@pytest.fixture
def paths(monkeypatch):
    """Counters on the three paths: the custom op, the eager autograd.Function, the launcher."""
    op, launcher = Count(ops._flash_attn_fwd_op), Count(ops._flash_fwd)
    function = Count(ops._FlashAttention.apply)
    monkeypatch.setattr(ops, "_flash_attn_fwd_op", op)
    monkeypatch.setattr(ops, "_flash_fwd", launcher)
    monkeypatch.setattr(ops._FlashAttention, "apply", function)
    return op, function, launcher


def test_eager_without_grad_calls_the_launcher_alone(paths, device):
    op, function, launcher = paths
    q, k, v = (torch.randn(1, 2, 9, 16, device=device) for _ in range(3))
    flash_attention(q, k, v, causal=True)
    with torch.no_grad():
        flash_attention(q.requires_grad_(), k, v)
    cu = torch.tensor([0, 9], dtype=torch.int32, device=device)
    flash_attention_varlen(q[0].detach().transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, 9, 9)
    assert (op.calls, function.calls, launcher.calls) == (0, 0, 3)


def test_eager_with_grad_takes_the_autograd_function(paths, device):
    op, function, launcher = paths
    q = torch.randn(1, 2, 9, 16, device=device)
    k, v = (torch.randn(1, 2, 9, 16, device=device) for _ in range(2))
    sinks = torch.zeros(2, device=device, requires_grad=True)  # only the sinks require grad: still differentiated
    o = flash_attention(q, k, v, causal=True, sinks=sinks)
    o.sum().backward()
    assert (op.calls, function.calls) == (0, 1) and sinks.grad is not None


def test_torch_compile_traces_the_custom_op(device):
    """fullgraph=True: the graph holds the op (forward and backward), not the launcher's Python."""
    targets = []

    def backend(gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def record(graph, inputs):
            targets.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
            return make_boxed_func(graph.forward)
        return aot_autograd(fw_compiler=record, bw_compiler=record)(gm, example_inputs)

    torch._dynamo.reset()
    q = torch.randn(1, 2, 9, 16, device=device, requires_grad=True)
    k, v = (torch.randn(1, 2, 9, 16, device=device) for _ in range(2))
    compiled = torch.compile(lambda q, k, v: flash_attention(q, k, v, causal=True), backend=backend, fullgraph=True)
    o = compiled(q, k, v)
    o.sum().backward()
    assert "attention_playground.flash_attn_fwd.default" in targets, targets
    assert "attention_playground.flash_attn_bwd.default" in targets, targets
    with torch.no_grad():
        assert torch.equal(o, flash_attention(q, k, v, causal=True)), "the op and the eager path differ"


def test_the_eager_autograd_function_and_the_ops_give_the_same_bits(device):
    """Two autograd implementations of one computation: the eager Function and the ops' register_autograd."""
    torch.manual_seed(0)
    leaves = [torch.randn(1, 4, 13, 16, device=device), torch.randn(1, 2, 13, 16, device=device),
              torch.randn(1, 2, 13, 16, device=device), torch.randn(4, device=device)]
    slopes = torch.rand(4, device=device)
    results = []
    for through_op in (False, True):
        q, k, v, sinks = (t.clone().requires_grad_() for t in leaves)
        if through_op:
            o, lse = ops._flash_attn_fwd_op(q, k, v, slopes, sinks, None, None, None, [1, 5, 0, 0, 0, 1],
                                           [0.3, 8.0, 0.0])
        else:
            o, lse = flash_attention(q, k, v, causal=True, sm_scale=0.3, window_size=(5, 0), softcap=8.0,
                                     alibi_slopes=slopes, sinks=sinks, return_lse=True)
        (o.square().sum() + lse.sum()).backward()  # a gradient into lse too (delta's dlse term)
        results.append([o, lse, q.grad, k.grad, v.grad, sinks.grad])
    for name, eager, op in zip(("o", "lse", "dq", "dk", "dv", "dsinks"), *results):
        assert torch.equal(eager, op), f"{name} differs between the eager Function and the op"


def test_the_launchers_descriptor_test_is_the_full_one():
    """_flash_fwd tests TMA alignment on the strides it already read, in one expression: same answers."""
    base = torch.randn(2, 3, 40, 66, dtype=torch.float16)
    layouts = {"contiguous": base[..., :64].contiguous(), "head dim 64 of 66": base[..., :64],
               "transposed": base[..., :64].contiguous().transpose(1, 2),
               "start 2 bytes off": torch.randn(2 * 3 * 40 * 64 + 1, dtype=torch.float16)[1:].view(2, 3, 40, 64),
               "strided last": base[..., ::2], "head dim 8": base[..., :8].contiguous()}
    for name, t in layouts.items():
        for others in ((t, t), (layouts["contiguous"][..., :t.shape[-1]], t)):
            q, k, v = t, *others
            expected = fa._descriptor_loads_allowed(q, k, v)
            assert fa._descriptor_views_allowed(q, k, v, q.stride(), k.stride(), v.stride()) == expected, name
    packed = base[0, :, :, :64].transpose(0, 1)  # (40, 3, 64) strided
    strides = fa._packed_strides(packed)
    assert fa._descriptor_views_allowed(packed, packed, packed, strides, strides, strides) == \
        fa._descriptor_loads_allowed(packed, packed, packed)
