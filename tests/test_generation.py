"""KV caches in the attention modules, and greedy generation with the small Llama: cached equals recomputed."""
import copy

import pytest
import torch

import modules
import reference
from conftest import DEVICE
from reference.llama import LlamaConfig
from tests.helpers import assert_close_to_reference, assert_no_near_greedy_ties, assert_same_tokens

D_MODEL, CONTEXT = 48, 64
GQA = dict(d_in=D_MODEL, d_out=D_MODEL, num_heads=4, num_kv_groups=2, context_length=CONTEXT)
# (module, cache layout): the reference's plain math, and the Triton twin (prefill through
# flash_attention, later steps through decode_attention), on both layouts; MQA on the twin.
MODULES = [
    pytest.param(lambda: reference.GroupedQueryAttention(**GQA), None, id="reference-contiguous"),
    pytest.param(lambda: reference.GroupedQueryAttention(**GQA), 16, id="reference-paged"),
    pytest.param(lambda: modules.GroupedQueryAttention(**GQA), None, id="triton-contiguous"),
    pytest.param(lambda: modules.GroupedQueryAttention(**GQA), 16, id="triton-paged"),
    pytest.param(lambda: modules.MultiQueryAttention(D_MODEL, D_MODEL, 4, CONTEXT), 16, id="triton-mqa-paged"),
]
# Chunks fed one after another: a prefill of 7 tokens, a chunk of 3, two single tokens, a chunk
# of 6 that crosses the edge of the first 16-row block, then a chunk of 18, more than decode_attention
# takes (the Triton twin runs it on the reference's math).
STEPS = (7, 3, 1, 1, 6, 18)


@pytest.mark.parametrize("make, block_size", MODULES)
def test_cached_forward_equals_uncached_forward(make, block_size, device):
    module = make().to(device).eval()
    plain = copy.deepcopy(module)  # fp32, no cache, the reference's own math: PyTorch's error
    if isinstance(plain, modules.GroupedQueryAttention):
        plain.backend = "naive"
    x = torch.randn(2, sum(STEPS), D_MODEL, device=device)
    cache = reference.KVCache(2, module.num_kv_groups, module.head_dim, 48, device=device, block_size=block_size)
    outputs, start = [], 0
    with torch.no_grad():
        for n in STEPS:
            outputs.append(module(x[:, start:start + n], cache))
            start += n
        cached = torch.cat(outputs, dim=1)
        expected = copy.deepcopy(plain).double()(x.double())
        plain = plain(x)
    assert cache.lengths == [sum(STEPS)] * 2 and cache.seqlens.tolist() == cache.lengths
    assert_close_to_reference(cached, expected, plain, name="cached forward")


def test_kv_cache_pages_grow_and_truncate(device):
    cache = reference.KVCache(2, 1, 4, 40, device=device, block_size=16)
    assert cache.block_table.shape == (2, 3) and (cache.block_table == -1).all()
    cache.append(*torch.randn(2, 2, 1, 17, 4, device=device))  # 17 tokens: two blocks each
    assert [len(b) for b in cache.blocks] == [2, 2] and len(cache.free_blocks) == 2
    assert cache.positions(2).tolist() == [[17, 18], [17, 18]]
    cache.truncate([3, 17])  # sequence 0 keeps one block; the other goes back to the free list
    assert [len(b) for b in cache.blocks] == [1, 2] and len(cache.free_blocks) == 3
    assert cache.seqlens.tolist() == [3, 17] and cache.positions(1).tolist() == [[3], [17]]
    with pytest.raises(ValueError, match="the cache holds up to 40 tokens"):
        cache.append(*torch.randn(2, 2, 1, 24, 4, device=device))
    with pytest.raises(ValueError, match="lengths must hold 2 values"):
        cache.truncate([4, 17])


def test_cache_misuse_is_refused(device):
    module = reference.GroupedQueryAttention(**GQA).to(device)
    cache = reference.KVCache(2, 2, 12, CONTEXT, device=device)
    x = torch.randn(2, 5, D_MODEL, device=device)
    with pytest.raises(ValueError, match="dropout"):
        reference.GroupedQueryAttention(**GQA, dropout=0.1).to(device).train()(x, cache)
    module(torch.randn(2, CONTEXT - 2, D_MODEL, device=device), cache)
    with pytest.raises(ValueError, match="pass context_length"):
        module(x, cache)


# ----------------------------------------------------------------------------
# Greedy generation: the naive model, recomputing everything, against the Triton one with a cache
# ----------------------------------------------------------------------------
PROMPT_LENGTHS = (5, 17, 12)  # ragged: right-padded to 17 for the prefill
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def llama_pair():
    torch.manual_seed(0)
    naive = reference.Llama(LlamaConfig()).to(DEVICE).eval()  # fp32, 2 layers of width 64, 4 heads over 2 kv heads
    fast = modules.Llama(LlamaConfig(), backend="triton").to(DEVICE).eval()
    fast.load_state_dict(naive.state_dict())
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, naive.config.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    return naive, fast, prompts, naive.generate(prompts, NEW_TOKENS, use_cache=False)


def test_triton_with_cache_generates_the_naive_tokens(llama_pair):
    naive, fast, prompts, expected = llama_pair
    assert expected.shape == (len(PROMPT_LENGTHS), NEW_TOKENS)
    assert_same_tokens(fast.generate(prompts, NEW_TOKENS, use_cache=True), expected, "triton, contiguous cache")
    assert_same_tokens(naive.generate(prompts, NEW_TOKENS, use_cache=True), expected, "reference, contiguous cache")


def test_paged_cache_generates_the_naive_tokens(llama_pair):
    """Blocks of 16. The padded prefill takes two blocks per sequence and the truncation frees the second
    block of the 5- and 12-token prompts; the 12-token one needs a block again at its fifth token."""
    naive, fast, prompts, expected = llama_pair
    steps = 8
    assert_same_tokens(fast.generate(prompts, steps, use_cache=True, block_size=16), expected[:, :steps],
                        "triton, paged cache")
    assert_same_tokens(naive.generate(prompts, NEW_TOKENS, use_cache=True, block_size=16), expected,
                        "reference, paged cache")


def test_greedy_choices_are_not_near_ties(llama_pair):
    naive, _, prompts, expected = llama_pair
    assert_no_near_greedy_ties(naive, prompts, expected)


def test_llama_twin_shares_the_state_dict_and_generate_checks_arguments(llama_pair):
    naive, fast, prompts, _ = llama_pair
    assert naive.state_dict().keys() == fast.state_dict().keys()
    with pytest.raises(ValueError, match="max_new_tokens"):
        naive.generate(prompts, 0)
    with pytest.raises(ValueError, match="at least one token"):
        naive.generate([[1, 2], []], 4)
