"""kernels/mods.py: every mod, forward and backward, against its plain twin (reference/mods.py) in float64.

Each case names one pattern and the shape that stresses it; it runs in fp32
through the mask_mod alone (every key block visited, the mask applied
everywhere) and in one half precision through create_block_mask (empty blocks
skipped, full ones unmasked), so both paths of the kernels see every mod.
Then: FlexAttention on the same patterns (the twins are its mods), the
built-in switches against their mod spellings, the key blocks the kernels load
against what the block mask lists, create_block_mask's lists against the plain
builder's, and the errors bad input gets.
"""
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import triton

import reference.mods as ref
from kernels import MaskMod, ScoreMod, create_block_mask, flash_attention, mods
from kernels.configs import KERNELS as CONFIGS
from kernels.runtime import INTERPRET
from reference import naive_attention
from reference.block_mask import create_block_mask as plain_create_block_mask
from reference.mods import naive_attention_mods
from tests.helpers import GRADIENT_FACTOR, assert_close_to_reference

# Blocks of 64 x 64 hold the interpreter's 64 x 32 tiles and give the small shapes here several blocks.
BLOCK = 64


@dataclass(frozen=True)
class ModCase:
    """One pattern on one shape. mask(m, device) and score(m, *params) build the mod from `m`, which is
    kernels.mods or its twin reference.mods: the same call spells both. params() makes the learned tensors."""
    id: str
    shape: tuple  # (B, Hq, Hkv, Nq, Nk, D)
    low: torch.dtype  # the half precision this case runs in, besides fp32
    mask: Callable | None = None
    score: Callable | None = None
    params: Callable = tuple
    sm_scale: float | None = None
    per_batch: bool = False  # the mask differs between batch entries: one block mask per entry


def _generator():
    return torch.Generator().manual_seed(18)


def doc_ids(batch, n):
    """Sorted document ids with documents of random lengths (some shorter than a block, some longer)."""
    g = _generator()
    rows = [torch.sort(torch.randint(0, max(2, n // 25), (n,), generator=g)).values for _ in range(batch)]
    return torch.stack(rows)


def span_ids(batch, n):
    """Two images per sequence (ids 1 and 2) among text (0), at different places in each sequence."""
    spans = torch.zeros(batch, n, dtype=torch.int64)
    for b in range(batch):
        spans[b, 5 + 11 * b:30 + 11 * b] = 1
        spans[b, 50 + 3 * b:81] = 2
    return spans


def tree_ancestors(batch, n):
    """(B, N, N) bool: a random tree per sequence (each node's parent an earlier node), ancestor-or-self."""
    g = _generator()
    ancestors = torch.zeros(batch, n, n, dtype=torch.bool)
    for b in range(batch):
        parent = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
        for i in range(n):
            j = i
            while j >= 0:
                ancestors[b, i, j] = True
                j = parent[j]
    return ancestors


CASES = [
    # FlexAttention's causal, top-left with Nq < Nk: the last 30 keys are seen by no query.
    ModCase("causal-top-left", (1, 2, 1, 70, 100, 16), torch.bfloat16, mask=lambda m, d: m.causal()),
    # FlashAttention's causal (offset = Nk - Nq), GQA, both lengths ragged.
    ModCase("causal-bottom-right-gqa", (1, 4, 2, 33, 130, 16), torch.float16, mask=lambda m, d: m.causal(97)),
    # Mistral's window of 32 keys: blocks left of it are empty, blocks inside it full.
    ModCase("sliding-window", (1, 2, 1, 100, 100, 16), torch.bfloat16, mask=lambda m, d: m.sliding_window(31)),
    # A two-sided band with Nq != Nk and the diagonal shifted: neither edge on a block boundary.
    ModCase("sliding-window-two-sided", (1, 2, 2, 70, 100, 16), torch.float16,
            mask=lambda m, d: m.sliding_window(20, 10, offset=30)),
    ModCase("prefix-lm", (1, 2, 1, 100, 100, 32), torch.bfloat16, mask=lambda m, d: m.prefix_lm(37)),
    # One prefix length per sequence, read from a tensor by batch index.
    ModCase("prefix-lm-per-batch", (2, 2, 1, 97, 97, 16), torch.float16,
            mask=lambda m, d: m.prefix_lm(torch.tensor([10, 70], device=d)), per_batch=True),
    # A packed batch, causal inside each document, different documents per batch entry.
    ModCase("document-causal", (2, 2, 1, 100, 100, 16), torch.bfloat16,
            mask=lambda m, d: m.document(doc_ids(2, 100).to(d), causal=True), per_batch=True),
    # Queries and keys from different packings (kv_doc_ids): Nq != Nk, not causal.
    ModCase("document-cross", (1, 2, 1, 40, 100, 16), torch.float16,
            mask=lambda m, d: m.document(torch.tensor([0] * 15 + [1] * 25, device=d),
                                         torch.tensor([0] * 60 + [1] * 40, device=d))),
    # Llama 4's chunks of 32 inside 64-key blocks: MQA.
    ModCase("chunked", (1, 4, 1, 100, 100, 16), torch.bfloat16, mask=lambda m, d: m.chunked(32)),
    # Gemma 3: images of 25 and ~30 tokens, straddling block edges, placed per sequence.
    ModCase("bidirectional-spans", (2, 2, 1, 97, 97, 16), torch.float16,
            mask=lambda m, d: m.bidirectional_spans(span_ids(2, 97).to(d)), per_batch=True),
    # Speculative decoding: 20 draft tokens in a tree per sequence after 60 cached keys, GQA.
    ModCase("tree", (2, 4, 2, 20, 80, 16), torch.bfloat16,
            mask=lambda m, d: m.tree(tree_ancestors(2, 20).to(d), prefix=60), per_batch=True),
    # T5's encoder bias, learned, unscaled scores as T5 has them; distances past max_distance clamp.
    ModCase("t5-bidirectional", (1, 2, 1, 97, 97, 16), torch.float16,
            score=lambda m, table: m.t5_relative_bias(table, max_distance=64), params=lambda: (torch.randn(2, 32),),
            sm_scale=1.0),
    # T5's decoder bias with a causal mask, decoding-style (Nq < Nk, bottom-right).
    ModCase("t5-decoder-causal", (1, 2, 1, 40, 100, 16), torch.bfloat16, mask=lambda m, d: m.causal(60),
            score=lambda m, table: m.t5_relative_bias(table, bidirectional=False, max_distance=40, offset=60),
            params=lambda: (torch.randn(2, 16),), sm_scale=1.0),
    # ALiBi with learned per-(batch, head) slopes, in a causal window.
    ModCase("alibi-learned-slopes", (2, 2, 1, 64, 64, 16), torch.float16, mask=lambda m, d: m.sliding_window(40),
            score=lambda m, slopes: m.alibi(slopes), params=lambda: (torch.rand(2, 2),)),
    # Gemma 2's softcap over document masking; sm_scale 1 makes the cap bite.
    ModCase("softcap-document", (1, 2, 1, 97, 97, 16), torch.bfloat16,
            mask=lambda m, d: m.document(doc_ids(1, 97)[0].to(d)), score=lambda m: m.softcap(2.0), sm_scale=1.0),
]
MASK_CASES = [c for c in CASES if c.mask is not None]


def case_params(cases):
    return [pytest.param(c, id=c.id) for c in cases]


# ----------------------------------------------------------------------------
# Running one case: the kernels, and the reference in any dtype
# ----------------------------------------------------------------------------
def inputs(case, dtype, device):
    b, h_q, h_kv, n_q, n_k, d = case.shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype)
               for h, n in ((h_q, n_q), (h_kv, n_k), (h_kv, n_k)))
    do = torch.randn(b, h_q, n_q, d, generator=g).to(device=device, dtype=dtype)
    params = tuple(p.to(device) for p in case.params())
    return q, k, v, do, params


def kernel_mods(case, params, device, block_mask):
    """flash_attention's keyword arguments for this case: the mask as a mask_mod, or as a block mask."""
    kwargs = {}
    if case.score is not None:
        kwargs["score_mod"] = case.score(mods, *params)
    if case.mask is not None:
        mask_mod = case.mask(mods, device)
        if block_mask:
            b, h_q, _, n_q, n_k, _ = case.shape
            kwargs["block_mask"] = create_block_mask(mask_mod, b if case.per_batch else None, None, n_q, n_k,
                                                     device=device, BLOCK_SIZE=BLOCK)
        else:
            kwargs["mask_mod"] = mask_mod
    return kwargs


def reference_run(case, q, k, v, do, params, dtype, device):
    """Output, lse and the gradients of q, k, v and the params, computed by reference.mods in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    # The learned tensors stay in their own dtype below float64 (as the kernels read them), in float64 above.
    learned = [p.detach().to(torch.float64 if dtype == torch.float64 else p.dtype).requires_grad_() for p in params]
    o, lse = naive_attention_mods(*leaves, score_mod=case.score(ref, *learned) if case.score else None,
                                  mask_mod=case.mask(ref, device) if case.mask else None, sm_scale=case.sm_scale,
                                  return_lse=True)
    o.backward(do.to(dtype))
    return o, lse, [t.grad for t in leaves + learned]


def check_case(case, dtype, device, block_mask):
    q, k, v, do, params = inputs(case, dtype, device)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    learned = [p.requires_grad_() for p in params]
    o, lse = flash_attention(*leaves, sm_scale=case.sm_scale, return_lse=True,
                             **kernel_mods(case, learned, device, block_mask))
    o.backward(do)
    o64, lse64, grads64 = reference_run(case, q, k, v, do, params, torch.float64, device)
    o_torch, _, grads_torch = reference_run(case, q, k, v, do, params, dtype, device)
    assert_close_to_reference(o, o64, o_torch, name="o")
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite), "lse must be -inf exactly where a row sees no key"
    _, lse32, _ = reference_run(case, q, k, v, do, params, torch.float32, device)
    assert_close_to_reference(lse[finite], lse64[finite], lse32[finite], name="lse")
    names = ["dq", "dk", "dv"] + [f"d params[{i}]" for i in range(len(learned))]
    for name, t, grad64, grad_torch in zip(names, leaves + learned, grads64, grads_torch):
        assert_close_to_reference(t.grad, grad64, grad_torch, factor=GRADIENT_FACTOR, name=name)


@pytest.mark.parametrize("case", case_params(CASES))
def test_mod_fp32_mask_mod_matches_float64(case, device):
    check_case(case, torch.float32, device, block_mask=False)


@pytest.mark.parametrize("case", case_params(CASES))
def test_mod_half_precision_block_mask_matches_float64(case, device):
    check_case(case, case.low, device, block_mask=True)


# ----------------------------------------------------------------------------
# FlexAttention on the same patterns
# ----------------------------------------------------------------------------
def flex_or_skip(device):
    """torch's flex_attention and create_block_mask, eager; skipped (with the reason) where torch lacks them."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask as flex_block_mask
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as exc:
        pytest.skip(f"torch {torch.__version__} has no FlexAttention: {exc}")
    return flex_attention, flex_block_mask


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
@pytest.mark.parametrize("case", case_params(CASES))
def test_flex_attention_agrees_on_the_same_pattern(case, device):
    """Forward only: FlexAttention has no backward on the CPU (torch 2.13 raises for requires_grad there).

    The twins in reference.mods are FlexAttention's mods as they are; its block mask
    (BLOCK_SIZE 128, FlexAttention's default) lists the same blocks as ours.
    """
    flex_attention, flex_block_mask = flex_or_skip(device)
    b, h_q, h_kv, n_q, n_k, _ = case.shape
    q, k, v, _, params = inputs(case, torch.float32, device)
    kwargs = kernel_mods(case, params, device, block_mask=False)
    flex_kwargs = {}
    if case.score is not None:
        flex_kwargs["score_mod"] = case.score(ref, *params)
    if case.mask is not None:
        mask_mod = kwargs.pop("mask_mod")
        batch = b if case.per_batch else None
        ours = create_block_mask(mask_mod, batch, None, n_q, n_k, device=device)
        theirs = flex_block_mask(case.mask(ref, device), batch, None, n_q, n_k, device=device)
        for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
            assert torch.equal(getattr(ours, name).cpu(), getattr(theirs, name).cpu().to(torch.int32)), name
        for name, count in (("kv_indices", "kv_num_blocks"), ("full_kv_indices", "full_kv_num_blocks")):
            for row, n in enumerate(getattr(ours, count).flatten().tolist()):
                mine = getattr(ours, name).flatten(0, -2)[row, :n].sort().values.cpu()
                flex = getattr(theirs, name).flatten(0, -2)[row, :n].sort().values.cpu().to(torch.int32)
                assert torch.equal(mine, flex), f"{name} row {row}: {mine.tolist()} != {flex.tolist()}"
        kwargs["block_mask"], flex_kwargs["block_mask"] = ours, theirs
    with torch.no_grad():
        o = flash_attention(q, k, v, sm_scale=case.sm_scale, **kwargs)
        o_flex = flex_attention(q, k, v, scale=case.sm_scale, enable_gqa=h_q != h_kv, **flex_kwargs)
    o64, _, _ = reference_run(case, q, k, v, torch.zeros_like(o), params, torch.float64, device)
    o32, _, _ = reference_run(case, q, k, v, torch.zeros_like(o), params, torch.float32, device)
    assert_close_to_reference(o_flex, o64, o32, name="FlexAttention's o")
    _, allowed = assert_close_to_reference(o, o64, o32, name="o")
    assert (o - o_flex).abs().max().item() <= 2 * allowed


def test_flex_attention_has_no_cpu_backward_here():
    """Why the FlexAttention comparison is forward only on the CPU: say so if a torch upgrade changes it."""
    flex_attention, _ = flex_or_skip("cpu")
    q = torch.randn(1, 1, 16, 16, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
    except NotImplementedError as exc:
        assert "backward on CPU" in str(exc)
    else:
        pytest.fail(f"torch {torch.__version__} runs FlexAttention's backward on the CPU: compare gradients too")


# ----------------------------------------------------------------------------
# The built-in switches and their mod spellings
# ----------------------------------------------------------------------------
def run_grads(q, k, v, do, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = flash_attention(*leaves, **kwargs)
    o.backward(do)
    return [o] + [t.grad for t in leaves]


SPELLINGS = [
    # (id, shape (B, Hq, Hkv, Nq, Nk, D), built-in options, mods (offset = Nk - Nq where it applies))
    ("causal", (1, 4, 2, 40, 100, 16), dict(causal=True), lambda d: dict(mask_mod=mods.causal(60))),
    ("causal-block-mask", (1, 4, 2, 40, 100, 16), dict(causal=True),
     lambda d: dict(block_mask=create_block_mask(mods.causal(60), None, None, 40, 100, device=d, BLOCK_SIZE=BLOCK))),
    ("window-causal", (1, 2, 1, 100, 100, 16), dict(causal=True, window_size=(31, 0)),
     lambda d: dict(mask_mod=mods.sliding_window(31))),
    ("window-two-sided", (1, 2, 1, 70, 100, 16), dict(window_size=(20, 5)),
     lambda d: dict(mask_mod=mods.sliding_window(20, 5, offset=30))),
    ("softcap", (1, 2, 1, 70, 70, 16), dict(softcap=3.0, sm_scale=1.0),
     lambda d: dict(score_mod=mods.softcap(3.0), sm_scale=1.0)),
    ("alibi-causal", (2, 2, 1, 40, 70, 16), dict(causal=True, alibi_slopes="slopes"),
     lambda d: dict(score_mod=mods.alibi(SLOPES.to(d), offset=30), mask_mod=mods.causal(30))),
]
SLOPES = torch.tensor([[0.5, 0.25], [0.125, 1.0]])  # (B, Hq)


@pytest.mark.parametrize("spelling", [pytest.param(s[1:], id=s[0]) for s in SPELLINGS])
def test_builtin_switch_and_its_mod_agree(spelling, device):
    (b, h_q, h_kv, n_q, n_k, d), builtin, spelled = spelling
    builtin = {key: (SLOPES.to(device) if value == "slopes" else value) for key, value in builtin.items()}
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(device) for h, n in ((h_q, n_q), (h_kv, n_k), (h_kv, n_k)))
    do = torch.randn(b, h_q, n_q, d, generator=g).to(device)
    with_switch = run_grads(q, k, v, do, **builtin)
    with_mods = run_grads(q, k, v, do, **spelled(device))
    # Both against the built-in's float64 reference (reference.naive_attention with the same options).
    refs = {}
    for dtype in (torch.float64, torch.float32):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o = naive_attention(*leaves, dtype=dtype, **builtin)
        o.backward(do.to(dtype))
        refs[dtype] = [o] + [t.grad for t in leaves]
    for name, switch, mod, r64, r32 in zip(("o", "dq", "dk", "dv"), with_switch, with_mods, refs[torch.float64],
                                           refs[torch.float32]):
        factor = 2.0 if name == "o" else GRADIENT_FACTOR
        assert_close_to_reference(switch, r64, r32, factor=factor, name=f"{name} (built-in)")
        _, allowed = assert_close_to_reference(mod, r64, r32, factor=factor, name=f"{name} (mods)")
        assert (mod - switch).abs().max().item() <= allowed, f"{name}: built-in and mods differ"


# ----------------------------------------------------------------------------
# The key blocks the kernels load are the ones the block mask lists
# ----------------------------------------------------------------------------
@pytest.fixture
def tile_loads(monkeypatch):
    """Every load the interpreter runs: (first address, shape) of its pointer tile."""
    if not INTERPRET:
        pytest.skip("counts the loads the Triton interpreter runs")
    from triton.runtime import interpreter

    loads = []
    original = interpreter.InterpreterBuilder.create_masked_load

    def counted(self, ptrs, *args, **kwargs):
        loads.append((int(ptrs.data.flat[0]), ptrs.data.shape))
        return original(self, ptrs, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", counted)
    return loads


def padded(shape, device, pad=BLOCK):
    """A (B, H, N, D) view of a (B, H, N + pad, D) buffer: a tile hanging past row N still lies in its own (b, h)."""
    b, h, n, d = shape
    return torch.randn(b, h, n + pad, d, device=device)[:, :, :n].requires_grad_()


def tiles_of(loads, t, rows):
    """Counter of (b, head, first row) of the `rows`-row tiles loaded from t, a view made by `padded`."""
    base = t._base
    start, size = base.data_ptr(), base.numel() * base.element_size()
    found = Counter()
    for address, shape in loads:
        if len(shape) == 2 and shape[0] == rows and start <= address < start + size:
            offset = (address - start) // base.element_size()
            found[(offset // base.stride(0), offset % base.stride(0) // base.stride(1),
                   offset % base.stride(1) // base.stride(2))] += 1
    return found


def listed(lists, b, h, row, block, tile):
    """Starts of the tile-row sub-tiles of the blocks (partial and full) listed in lists[:, b, h, row]."""
    starts = []
    for kind in range(2):
        entry = lists[kind, min(b, lists.shape[1] - 1), min(h, lists.shape[2] - 1), row].tolist()
        starts += [blk * block + s * tile for blk in entry[1:1 + entry[0]] for s in range(block // tile)]
    return starts


def test_key_blocks_loaded_are_the_listed_ones(tile_loads, device):
    """Per batch entry its own documents: each kernel loads exactly the K (and Q) tiles of the listed blocks."""
    b, h_q, h_kv, n, d = 2, 2, 1, 200, 16
    group = h_q // h_kv
    q, k, v = (padded((b, h, n, d), device) for h in (h_q, h_kv, h_kv))
    # Long documents, so some blocks are full, some partial, some empty; different ones per entry.
    ids = torch.tensor([[0] * 150 + [1] * 50, [0] * 30 + [1] * 170], device=device)
    bm = create_block_mask(mods.document(ids, causal=True), b, None, n, n, device=device, BLOCK_SIZE=BLOCK)
    assert 0 < bm.sparsity() < 1 and bm.kv_num_blocks.sum() > 0 and bm.full_kv_num_blocks.sum() > 0
    o = flash_attention(q, k, v, block_mask=bm)
    fwd = CONFIGS["fwd"].last_config.kwargs
    expected = Counter()
    for z in range(b):
        for h in range(h_q):
            for start_m in range(0, n, fwd["BLOCK_M"]):
                for start_n in listed(bm.kv, z, h, start_m // BLOCK, BLOCK, fwd["BLOCK_N"]):
                    expected[(z, h // group, start_n)] += 1
    assert tiles_of(tile_loads, k, fwd["BLOCK_N"]) == expected, "forward: K tiles loaded != listed"
    visited = sum(expected.values())
    every = b * h_q * -(-n // fwd["BLOCK_M"]) * -(-n // fwd["BLOCK_N"])
    assert visited < every, f"the block mask skipped nothing: {visited} of {every} K tiles"

    tile_loads.clear()
    o.backward(torch.randn_like(o))
    dkdv, dq = CONFIGS["bwd_dkdv"].last_config.kwargs, CONFIGS["bwd_dq"].last_config.kwargs
    expected_k, expected_q = Counter(), Counter()
    for z in range(b):
        for kv_head in range(h_kv):
            for start_n in range(0, n, dkdv["BLOCK_N"]):
                expected_k[(z, kv_head, start_n)] += 1  # dK/dV: its own key block, once
                for h in range(kv_head * group, (kv_head + 1) * group):
                    for start_m in listed(bm.q, z, h, start_n // BLOCK, BLOCK, dkdv["BLOCK_M"]):
                        expected_q[(z, h, start_m)] += 1
        for h in range(h_q):
            for start_m in range(0, n, dq["BLOCK_M"]):
                expected_q[(z, h, start_m)] += 1  # dQ: its own query block, once
                for start_n in listed(bm.kv, z, h, start_m // BLOCK, BLOCK, dq["BLOCK_N"]):
                    expected_k[(z, h // group, start_n)] += 1
    assert dkdv["BLOCK_N"] == dq["BLOCK_N"] and dkdv["BLOCK_M"] == dq["BLOCK_M"], "tile sizes tell the kernels apart"
    assert tiles_of(tile_loads, k, dq["BLOCK_N"]) == expected_k, "backward: K tiles loaded != listed"
    assert tiles_of(tile_loads, q, dq["BLOCK_M"]) == expected_q, "backward: Q tiles loaded != listed"


# ----------------------------------------------------------------------------
# create_block_mask against the plain builder
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [BLOCK, (64, 128)], ids=["64", "64x128"])
@pytest.mark.parametrize("case", case_params(MASK_CASES))
def test_create_block_mask_lists_equal_the_plain_builders(case, block_size, device):
    b, _, _, n_q, n_k, _ = case.shape
    batch = b if case.per_batch else None
    bm = create_block_mask(case.mask(mods, device), batch, None, n_q, n_k, device=device, BLOCK_SIZE=block_size)
    plain = plain_create_block_mask(case.mask(ref, device), batch, None, n_q, n_k, device=device,
                                    BLOCK_SIZE=block_size)
    assert bm.block_size == plain.block_size and bm.seq_lengths == plain.seq_lengths
    assert torch.equal(bm.kv.cpu(), plain.kv), f"kv lists differ:\n{bm.kv}\n{plain.kv}"
    assert torch.equal(bm.q.cpu(), plain.q), f"q lists differ:\n{bm.q}\n{plain.q}"


def test_plain_builder_counts_by_hand():
    """Causal, 130 x 130 in 64-blocks: the diagonal blocks are partial, and so is every block of the last
    query block, whose 2 rows are cut short (a full block is loaded with no bounds check)."""
    plain = plain_create_block_mask(ref.causal(), None, None, 130, 130, BLOCK_SIZE=64)
    assert plain.kv[0, 0, 0].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [3, 0, 1, 2]]  # partial: count, blocks
    assert plain.kv[1, 0, 0].tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]  # full
    assert plain.q[0, 0, 0, :, 0].tolist() == [2, 2, 1] and plain.q[1, 0, 0, :, 0].tolist() == [1, 0, 0]


# ----------------------------------------------------------------------------
# Learned tensors: the T5 table and the slopes are covered by the cases; a dense pair bias is attn_bias
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_learned_pair_bias_is_attn_bias_with_its_gradient(dtype, device):
    """AlphaFold's pair bias: (Hq, Nq, Nk), shared by the batch, learned, under a document mask_mod."""
    b, h, n, d = 2, 2, 97, 16
    g = torch.Generator().manual_seed(2)
    q, k, v, do = (torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    bias = torch.randn(h, n, n, generator=g).to(device)
    ids = doc_ids(b, n).to(device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + [bias.clone().requires_grad_()]
    o = flash_attention(*leaves[:3], attn_bias=leaves[3], mask_mod=mods.document(ids))
    o.backward(do)
    results = {}
    for ref_dtype in (torch.float64, dtype):
        r = [t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v)]
        r.append(bias.detach().to(torch.float64 if ref_dtype == torch.float64 else bias.dtype).requires_grad_())
        o_ref = naive_attention_mods(*r[:3], attn_bias=r[3], mask_mod=ref.document(ids))
        o_ref.backward(do.to(ref_dtype))
        results[ref_dtype] = [o_ref] + [t.grad for t in r]
    for i, (name, mine) in enumerate(zip(("o", "dq", "dk", "dv", "d attn_bias"), [o] + [t.grad for t in leaves])):
        assert_close_to_reference(mine, results[torch.float64][i], results[dtype][i],
                                  factor=2.0 if name == "o" else GRADIENT_FACTOR, name=name)


def test_a_t5_table_that_needs_no_gradient_gets_none(device):
    """Only args that require grad get gradient buffers: a frozen table in a trained model is read, not summed."""
    q = torch.randn(1, 2, 40, 16, device=device, requires_grad=True)
    table = torch.randn(2, 32, device=device)
    o = flash_attention(q, q.detach(), q.detach(), score_mod=mods.t5_relative_bias(table, max_distance=64))
    o.sum().backward()
    assert table.grad is None and q.grad is not None and torch.isfinite(q.grad).all()


def test_t5_buckets_are_hugging_faces():
    """T5's buckets for 32 buckets, max distance 128, worked out by hand: 16 per side, 8 exact, then
    8 + floor(8 * log(d / 8) / log(16)) up to 15; keys after the query (relative > 0) on buckets 16..31."""
    relative = torch.tensor([-200, -128, -127, -64, -20, -8, -7, -1, 0, 1, 7, 8, 12, 20, 64, 127, 128, 500])
    buckets = ref.t5_bucket(relative, bidirectional=True, num_buckets=32, max_distance=128)
    assert buckets.tolist() == [15, 15, 15, 14, 10, 8, 7, 1, 0, 17, 23, 24, 25, 26, 30, 31, 31, 31]
    decoder = ref.t5_bucket(torch.tensor([5, 0, -3, -20]), bidirectional=False, num_buckets=32, max_distance=128)
    assert decoder.tolist() == [0, 0, 3, 17]  # 32 buckets on one side, 16 exact: 16 + floor(16 log(20/16) / log 8)
    table = mods.t5_bucket_table(True, 32, 128)
    assert table.shape == (257,) and table[128].item() == 0 and table[0].item() == 15 and table[-1].item() == 31


# ----------------------------------------------------------------------------
# Bad input: clear errors that name the argument
# ----------------------------------------------------------------------------
BAD_CONSTRUCTORS = [
    (lambda: mods.causal(1.5), TypeError, "offset"),
    (lambda: mods.sliding_window(-3), ValueError, "left"),
    (lambda: mods.sliding_window(3, "0"), TypeError, "right"),
    (lambda: mods.prefix_lm(-1), ValueError, "prefix_length"),
    (lambda: mods.prefix_lm(torch.tensor([1.0, 2.0])), TypeError, "prefix_length"),
    (lambda: mods.prefix_lm(torch.ones(2, 2, dtype=torch.int64)), ValueError, "prefix_length"),
    (lambda: mods.document(torch.zeros(4)), TypeError, "doc_ids"),
    (lambda: mods.document(torch.zeros(2, 3, 4, dtype=torch.int64)), ValueError, "doc_ids"),
    (lambda: mods.document(torch.zeros(2, 4, dtype=torch.int64), torch.zeros(3, 5, dtype=torch.int64)), ValueError,
     "kv_doc_ids"),
    (lambda: mods.document(torch.zeros(4, dtype=torch.int64), causal=1), TypeError, "causal"),
    (lambda: mods.chunked(0), ValueError, "chunk_size"),
    (lambda: mods.bidirectional_spans([0, 1, 1]), TypeError, "span_ids"),
    (lambda: mods.tree(torch.ones(3, 4, dtype=torch.bool)), ValueError, "ancestors"),
    (lambda: mods.tree(torch.ones(3, 3)), TypeError, "ancestors"),
    (lambda: mods.tree(torch.ones(3, 3, dtype=torch.bool), prefix=-2), ValueError, "prefix"),
    (lambda: mods.t5_relative_bias(torch.zeros(32)), ValueError, "table"),
    (lambda: mods.t5_relative_bias(torch.zeros(2, 32), num_buckets=16), ValueError, "num_buckets"),
    (lambda: mods.t5_relative_bias(torch.zeros(2, 32), max_distance=4), ValueError, "max_distance"),
    (lambda: mods.alibi(torch.ones(2, dtype=torch.int64)), TypeError, "slopes"),
    (lambda: mods.softcap(0.0), ValueError, "value"),
]


@pytest.mark.parametrize("make, error, name", BAD_CONSTRUCTORS,
                         ids=[f"{i}-{name}" for i, (_, _, name) in enumerate(BAD_CONSTRUCTORS)])
def test_bad_mod_arguments_are_named(make, error, name):
    with pytest.raises(error, match=name):
        make()


BAD_SHAPES = [
    (lambda: mods.document(torch.zeros(3, 50, dtype=torch.int64)), "doc_ids"),  # 3 rows, batch 2
    (lambda: mods.document(torch.zeros(40, dtype=torch.int64)), "doc_ids"),  # 40 positions, Nk 50
    (lambda: mods.bidirectional_spans(torch.zeros(2, 49, dtype=torch.int64)), "span_ids"),
    (lambda: mods.prefix_lm(torch.tensor([3, 4, 5])), "prefix_length"),
    (lambda: mods.tree(torch.ones(20, 20, dtype=torch.bool), prefix=20), "ancestors"),  # needs Nk = 40
    (lambda: mods.t5_relative_bias(torch.zeros(3, 32)), "table"),
    (lambda: mods.alibi(torch.ones(3)), "slopes"),
]


@pytest.mark.parametrize("make, name", BAD_SHAPES, ids=[f"{i}-{name}" for i, (_, name) in enumerate(BAD_SHAPES)])
def test_mod_checks_its_tensors_against_the_call(make, name):
    """The shapes only a call can judge: batch 2, Hq 2, Nq 50, Nk 50."""
    with pytest.raises(ValueError, match=name):
        make().check(2, 2, 50, 50)
    mods.document(torch.zeros(2, 50, dtype=torch.int64)).check(2, 2, 50, 50)  # the right shapes pass


def test_flash_attention_checks_the_mods_tensors(device):
    q = torch.randn(1, 2, 50, 16, device=device)
    with pytest.raises(ValueError, match="doc_ids"):
        flash_attention(q, q, q, mask_mod=mods.document(torch.zeros(40, dtype=torch.int64, device=device)))


@triton.jit
def _score_without_args(score, b, h, q_idx, kv_idx):
    return score


@triton.jit
def _mask_without_args(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@pytest.mark.parametrize("kwargs, name", [(dict(score_mod=_score_without_args), "score_mod"),
                                          (dict(mask_mod=_mask_without_args), "mask_mod")],
                         ids=["score_mod", "mask_mod"])
def test_a_mod_with_the_wrong_signature_is_named(kwargs, name, device):
    q = torch.randn(1, 1, 16, 16, device=device)
    with pytest.raises((TypeError, ValueError), match=name):
        flash_attention(q, q, q, **kwargs)


def test_bad_block_masks_and_biases_are_named(device):
    q = torch.randn(2, 2, 50, 16, device=device, requires_grad=True)
    with pytest.raises(ValueError, match=r"block_mask was built for \(Nq, Nk\) = \(60, 50\)"):
        flash_attention(q, q, q, block_mask=create_block_mask(mods.causal(), None, None, 60, 50, device=device))
    with pytest.raises(ValueError, match="block_mask was built for B = 3"):
        flash_attention(q, q, q, block_mask=create_block_mask(mods.causal(), 3, None, 50, 50, device=device))
    small = create_block_mask(mods.causal(), None, None, 50, 50, device=device, BLOCK_SIZE=16)
    with pytest.raises(ValueError, match=r"block_mask's blocks \(16 x 16\) are smaller"):
        flash_attention(q, q, q, block_mask=small)
    with pytest.raises(ValueError, match="causal and sliding windows as mask_mods"):
        flash_attention(q, q, q, causal=True, block_mask=create_block_mask(mods.causal(), None, None, 50, 50,
                                                                           device=device))
    with pytest.raises(ValueError, match="attn_bias of shape"):
        flash_attention(q, q, q, attn_bias=torch.zeros(3, 50, 50, device=device))
    with pytest.raises(ValueError, match="BLOCK_SIZE"):
        create_block_mask(mods.causal(), None, None, 50, 50, device=device, BLOCK_SIZE=48)


def test_a_score_mod_without_a_derivative_refuses_a_gradient(device):
    q = torch.randn(1, 1, 16, 16, device=device, requires_grad=True)
    no_derivative = ScoreMod(mods.softcap(2.0).fn, (2.0,))
    with pytest.raises(ValueError, match="score_mod has no derivative"):
        flash_attention(q, q, q, score_mod=no_derivative)
    with torch.no_grad():
        flash_attention(q, q, q, score_mod=no_derivative)  # no gradient asked: it runs


def test_library_mods_are_mods_and_say_what_they_are():
    mask, score = mods.document(torch.zeros(2, 10, dtype=torch.int64), causal=True), mods.alibi(torch.ones(4))
    assert isinstance(mask, MaskMod) and isinstance(score, ScoreMod) and score.bwd is not None
    assert repr(mask) == "document(doc_ids=(2, 10), causal=True, offset=0)"
    assert repr(mods.sliding_window(None, 0)) == "sliding_window(None, 0, offset=0)"
    assert math.isclose(mods.softcap(30).args[0], 30.0)
