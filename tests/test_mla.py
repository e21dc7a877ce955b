"""Multi-head latent attention (reference/mla.py, modules/mla.py): the absorbed form equals the naive one,
the latent cache is one tensor and shrinks the cache by a computed factor, the Triton twin generates the
naive model's tokens, and decode_attention runs DeepSeek-V3's real decode dims (576/512, 128 heads)."""
import copy

import pytest
import torch

import kernels
import modules
import reference
from conftest import DEVICE
from reference.decode import gather_cache
from reference.mla import DEEPSEEK_V3, LatentCache, MLAConfig, cache_bytes_per_token
from reference.paged import paged_attention as paged_reference
from tests.helpers import assert_close, assert_close_to_reference, assert_no_near_greedy_ties, assert_same_tokens

CONFIG = MLAConfig()  # 8 heads; kv_lora_rank 64, rope 16, nope 32, v 32: q/k 48 and v 32 naive, 80 and 64 absorbed
NO_Q_LORA = MLAConfig(q_lora_rank=None)  # DeepSeek-V2-Lite's queries: q_proj straight from x


def make_attention(config=CONFIG, cls=reference.MultiHeadLatentAttention, dtype=None, **kwargs):
    return cls(**config.attention_kwargs(), dtype=dtype, **kwargs).to(DEVICE).eval()


def new_cache(config, batch, capacity, dtype, block_size):
    return LatentCache(batch, config.kv_lora_rank, config.qk_rope_head_dim, capacity, dtype=dtype, device=DEVICE,
                       block_size=block_size)


def run_in_chunks(module, x, cache, chunks):
    """Feed x (b, n, d_model) through module with a cache, `chunks` tokens at a time; the outputs side by side."""
    outputs, start = [], 0
    for n in chunks:
        outputs.append(module(x[:, start:start + n], cache))
        start += n
    assert start == x.shape[1]
    return torch.cat(outputs, dim=1)


# ----------------------------------------------------------------------------
# The two forms are the same math
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("config", [CONFIG, NO_Q_LORA], ids=["q-lora", "q-proj"])
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "paged"])
def test_absorbed_form_equals_naive_form_in_float64(config, block_size):
    """The naive form (no cache: keys and values decompressed per head) against the absorbed form (a latent
    cache: W_UK in the query, W_UV after attention), fed a prefill of 7, one token, then a chunk of 5 that
    crosses the first 16-row page. Same math, so float64 agrees to rounding."""
    torch.manual_seed(0)
    module = make_attention(config, dtype=torch.float64)
    x = torch.randn(2, 13, config.d_model, device=DEVICE, dtype=torch.float64)
    cache = new_cache(config, 2, 32, torch.float64, block_size)
    with torch.no_grad():
        naive = module(x)
        absorbed = run_in_chunks(module, x, cache, (7, 1, 5))
    assert_close(absorbed, naive, "absorbed (latent cache) vs naive (decompressed)")
    assert cache.lengths == [13, 13]


def test_absorbed_scores_are_the_naive_scores():
    """Score by score: [q_nope W_UK^T ; q_pe] . [c_kv ; k_pe] = [q_nope ; q_pe] . [c_kv W_UK ; k_pe], per head."""
    torch.manual_seed(0)
    module = make_attention(dtype=torch.float64)
    x = torch.randn(1, 9, CONFIG.d_model, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        q_nope, q_pe = module.project_queries(x)
        c_kv, k_pe = module.project_latent(x)
        queries, keys, values = module.decompress(q_nope, q_pe, c_kv, k_pe)
        naive = queries @ keys.transpose(-2, -1)  # (1, H, 9, 9)
        latent = torch.cat([c_kv, k_pe], dim=-1)  # (1, 1, 9, L + rope): one row per token for every head
        absorbed = module.absorb_queries(q_nope, q_pe) @ latent.transpose(-2, -1)
    assert queries.shape[-1] == keys.shape[-1] == CONFIG.qk_head_dim == 48 and values.shape[-1] == 32
    assert module.absorb_queries(q_nope, q_pe).shape[-1] == CONFIG.latent_dim == 80
    assert_close(absorbed, naive, "absorbed scores vs naive scores")


# ----------------------------------------------------------------------------
# The latent cache: one tensor, and how much smaller than the MHA cache
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "paged"])
def test_latent_cache_is_one_tensor_with_v_a_view_of_k(block_size):
    cache = new_cache(CONFIG, 2, 40, torch.float32, block_size)
    assert cache.k.shape[1] == 1 and cache.k.shape[-1] == 80 and cache.v.shape[-1] == 64
    assert cache.v.untyped_storage().data_ptr() == cache.k.untyped_storage().data_ptr()
    assert cache.v.data_ptr() == cache.k.data_ptr() and cache.v.stride() == cache.k.stride()
    latent = torch.randn(2, 1, 19, 80, device=DEVICE)
    cache.append(latent)
    assert cache.lengths == [19, 19] and cache.seqlens.tolist() == [19, 19]
    for b in range(2):  # what was written reads back through both views
        assert torch.equal(gather_cache(cache.k, b, 19, cache.block_table), latent[b])
        assert torch.equal(gather_cache(cache.v, b, 19, cache.block_table), latent[b, :, :, :64])


def test_latent_cache_shrinks_the_cache_by_the_computed_factor():
    """Bytes per token, all layers: counted on the tiny model's real tensors, and for DeepSeek-V3's dims."""
    torch.manual_seed(0)
    model = reference.MLAModel(CONFIG).to(DEVICE).eval()
    caches = model.new_caches(batch=2, capacity=32)
    storages = {c.k.untyped_storage().data_ptr(): c.k.untyped_storage().nbytes() for c in caches}
    storages |= {c.v.untyped_storage().data_ptr(): c.v.untyped_storage().nbytes() for c in caches}
    latent_bytes = sum(storages.values()) / (2 * 32)  # v adds nothing: it is k's storage
    # Multi-head attention of the same model caches the naive form's per-head keys and values.
    attn = model.layers[0].self_attn
    x = torch.randn(1, 1, CONFIG.d_model, device=DEVICE)
    with torch.no_grad():
        q_nope, q_pe = attn.project_queries(x)
        _, keys, values = attn.decompress(q_nope, q_pe, *attn.project_latent(x))
    mha_bytes = CONFIG.num_layers * (keys.nbytes + values.nbytes)  # one token, every head
    assert (latent_bytes, mha_bytes) == cache_bytes_per_token(CONFIG, 4) == (2 * 80 * 4, 2 * 8 * (48 + 32) * 4)
    assert mha_bytes / latent_bytes == 8.0
    latent_v3, mha_v3 = cache_bytes_per_token(DEEPSEEK_V3, 2)  # bf16
    assert latent_v3 == 61 * 576 * 2 == 70_272 and mha_v3 == 61 * 128 * (192 + 128) * 2 == 4_997_120
    assert round(mha_v3 / latent_v3, 1) == 71.1


# ----------------------------------------------------------------------------
# The Triton twin
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "paged"])
def test_triton_cached_forward_obeys_the_tolerance_rule(block_size):
    """Prefill on flash_attention (q/k 48, v 32), then the absorbed form on decode_attention (q/k 80, v 64,
    one kv head): one token, one token, then a chunk of 20 (more than 16 new tokens in one step)."""
    torch.manual_seed(0)
    module = make_attention(cls=modules.MultiHeadLatentAttention)
    plain = copy.deepcopy(module)
    plain.backend = "naive"
    x = torch.randn(2, 29, CONFIG.d_model, device=DEVICE)
    cache = new_cache(CONFIG, 2, 40, torch.float32, block_size)
    with torch.no_grad():
        cached = run_in_chunks(module, x, cache, (7, 1, 1, 20))
        expected = copy.deepcopy(plain).double()(x.double())
        torch_fp32 = plain(x)
    assert_close_to_reference(cached, expected, torch_fp32, name="triton MLA, cached")


def test_sdpa_backend_and_state_dict_match_the_reference():
    torch.manual_seed(0)
    ref = make_attention()
    twin = make_attention(cls=modules.MultiHeadLatentAttention, backend="sdpa")
    twin.load_state_dict(ref.state_dict())
    assert ref.state_dict().keys() == twin.state_dict().keys()
    assert "q_a_proj.weight" in ref.state_dict() and "kv_a_proj_with_mqa.weight" in ref.state_dict()
    x = torch.randn(2, 6, CONFIG.d_model, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), ref(x))


# ----------------------------------------------------------------------------
# Greedy generation: the naive model without a cache against the Triton one with a latent cache
# ----------------------------------------------------------------------------
PROMPT_LENGTHS = (5, 17, 12)  # ragged: right-padded to 17 for the prefill
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def mla_pair():
    torch.manual_seed(0)
    naive = reference.MLAModel(CONFIG).to(DEVICE).eval()  # fp32, 2 layers
    fast = modules.MLAModel(CONFIG, backend="triton").to(DEVICE).eval()
    fast.load_state_dict(naive.state_dict())
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, CONFIG.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    return naive, fast, prompts, naive.generate(prompts, NEW_TOKENS, use_cache=False)


@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "paged"])
def test_triton_with_latent_cache_generates_the_naive_tokens(mla_pair, block_size):
    """Paged: the padded prefill takes two 16-row pages per sequence, truncation frees the second of the
    5- and 12-token prompts, and the 12-token one takes a page again at its fifth new token."""
    naive, fast, prompts, expected = mla_pair
    assert expected.shape == (len(PROMPT_LENGTHS), NEW_TOKENS)
    assert_same_tokens(fast.generate(prompts, NEW_TOKENS, block_size=block_size), expected, "triton, latent cache")
    assert_same_tokens(naive.generate(prompts, NEW_TOKENS, block_size=block_size), expected,
                        "reference, latent cache")


def test_greedy_choices_are_not_near_ties(mla_pair):
    naive, _, prompts, expected = mla_pair
    assert_no_near_greedy_ties(naive, prompts, expected)


# ----------------------------------------------------------------------------
# DeepSeek-V3's decode dims through the kernel
# ----------------------------------------------------------------------------
def v3_latent_cache(lengths, page_size=16, dtype=torch.bfloat16):
    """A paged latent cache in vLLM's pool layout, (pages, page, 1, 576) read as (pages, 1, page, 576), with
    shuffled pages; returns (k_cache, block_table)."""
    gen = torch.Generator().manual_seed(2)
    pages = [-(-n // page_size) for n in lengths]
    order = torch.randperm(sum(pages) + 1, generator=gen)  # one spare page no sequence owns
    pool = torch.randn(sum(pages) + 1, page_size, 1, DEEPSEEK_V3.latent_dim, generator=gen).to(dtype)
    pool[order[-1]] = float("nan")  # never read
    table = torch.full((len(lengths), max(pages)), -1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(pages):
        table[b, :n] = order[start:start + n]
        start += n
    return pool.permute(0, 2, 1, 3).to(DEVICE), table.to(DEVICE)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8-e4m3-per-row"])
def test_deepseek_v3_decode_dims(fp8):
    """One decode step of DeepSeek-V3's absorbed attention: 128 query heads over one latent kv head,
    q/k head dim 576 = 512 + 64, v = the latent's first 512 columns (a view), softmax scale 1/sqrt(192);
    lengths 37 and 5 over shuffled 16-row pages. fp8: the latent cache in e4m3 with one scale per row."""
    torch.manual_seed(0)
    lengths = (37, 5)
    k_cache, table = v3_latent_cache(lengths)
    scales = {}
    if fp8:
        latent = k_cache.float()
        scale = torch.nan_to_num(latent.abs().amax(-1), nan=1.0) / torch.finfo(torch.float8_e4m3fn).max
        k_cache = (latent / scale[..., None]).to(torch.float8_e4m3fn)  # (pages, 1, page, 576)
        scales = dict(k_scale=scale, v_scale=scale)  # v's rows are k's rows: one scale serves both
    v_cache = k_cache[..., :DEEPSEEK_V3.kv_lora_rank]
    assert v_cache.data_ptr() == k_cache.data_ptr()
    q = torch.randn(len(lengths), DEEPSEEK_V3.num_heads, 1, DEEPSEEK_V3.latent_dim, device=DEVICE,
                    dtype=torch.bfloat16)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    args = (q, k_cache, v_cache, seqlens, table)
    options = dict(sm_scale=DEEPSEEK_V3.qk_head_dim ** -0.5, **scales)
    with torch.no_grad():
        out = kernels.decode_attention(*args, **options)
    expected = paged_reference(*args, **options, dtype=torch.float64)
    torch_bf16 = paged_reference(*args, **options)
    assert out.shape == (2, 128, 1, 512) and out.dtype == torch.bfloat16
    assert_close_to_reference(out, expected, torch_bf16, name=f"DeepSeek-V3 decode ({'fp8' if fp8 else 'bf16'})")


# ----------------------------------------------------------------------------
# Bad input: errors that name the argument
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("change, match", [
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim must be even"),
    (dict(kv_lora_rank=0), "kv_lora_rank must be an int >= 1"),
    (dict(q_lora_rank=0), "q_lora_rank must be None"),
    (dict(v_head_dim=2.0), "v_head_dim must be an int >= 1"),
])
def test_bad_configuration_is_refused(change, match):
    with pytest.raises(ValueError, match=match):
        reference.MultiHeadLatentAttention(**{**CONFIG.attention_kwargs(), **change})


def test_bad_cache_use_is_refused():
    module = make_attention()
    x = torch.randn(2, 3, CONFIG.d_model, device=DEVICE)
    with pytest.raises(TypeError, match="cache must be a reference.LatentCache"):
        module(x, reference.KVCache(2, 1, 80, 16, device=DEVICE))
    with pytest.raises(ValueError, match="cache holds latent rows of 32 \\+ 16 dims but this layer makes 64 \\+ 16"):
        module(x, LatentCache(2, 32, 16, 16, device=DEVICE))
    cache = new_cache(CONFIG, 2, 16, torch.float32, None)
    with pytest.raises(ValueError, match=r"latent must have shape \(2, 1, num_tokens, 80\)"):
        cache.append(torch.randn(2, 1, 3, 64, device=DEVICE))
    with pytest.raises(TypeError, match="latent has dtype torch.float64"):
        cache.append(torch.randn(2, 1, 3, 80, device=DEVICE, dtype=torch.float64))
    with pytest.raises(ValueError, match="the cache holds up to 16 tokens"):
        module(torch.randn(2, 17, CONFIG.d_model, device=DEVICE), cache)
    with pytest.raises(ValueError, match="kv_lora_rank must be an int >= 1"):
        LatentCache(2, 0, 16, 16)


def test_kernel_refuses_head_dims_past_mla():
    """576/512 is the widest the kernel's tiles hold: one more q/k column, or v wider than 512, is named."""
    seqlens = torch.tensor([4], dtype=torch.int32, device=DEVICE)
    wide = torch.zeros(1, 1, 8, 640, device=DEVICE)
    with torch.no_grad(), pytest.raises(ValueError, match="head_dim .* between 1 and 576"):
        kernels.decode_attention(torch.zeros(1, 4, 1, 640, device=DEVICE), wide, wide[..., :512], seqlens)
    latent = torch.zeros(1, 1, 8, 576, device=DEVICE)
    with torch.no_grad(), pytest.raises(ValueError, match="v_cache's head dim must be between 1 and 512"):
        kernels.decode_attention(torch.zeros(1, 4, 1, 576, device=DEVICE), latent, latent, seqlens)
