"""The Triton online-softmax kernel against float64 and torch.softmax."""
import pytest
import torch

from kernels import softmax
from tests.cases import dtype_params
from tests.helpers import assert_close_to_reference, poisoned_like

SHAPES = [
    pytest.param((3, 1), id="1-column"),  # the max is the only element: output exactly 1
    pytest.param((4, 17), id="17-columns"),  # shorter than one block: the tail mask does all the work
    pytest.param((2, 4097), id="4097-columns"),  # several blocks and a 1-column tail
    pytest.param((1, 100_000), id="100000-columns"),  # many blocks: the running max is rescaled often
    pytest.param((5,), id="rank-1"),
    pytest.param((2, 3, 4, 33), id="rank-4"),
]


def check_softmax(x):
    out = softmax(x, out=poisoned_like(x))
    x64 = x.double()
    assert_close_to_reference(out, torch.softmax(x64, -1), torch.softmax(x, -1), name="softmax")
    return out


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_matches_torch(shape, dtype, device):
    check_softmax(torch.randn(shape, dtype=dtype, device=device) * 3)


@pytest.mark.parametrize("dtype", dtype_params())
def test_huge_logits_do_not_overflow(dtype, device):
    """±1e4 would overflow exp(); the running max keeps every exponent <= 0."""
    x = torch.tensor([[1e4, -1e4, 0.0, 1e4 - 1], [-1e4, -1e4 + 2, -1e4, -1e4]], dtype=dtype, device=device)
    x = x.repeat(1, 700)  # 2800 columns: the largest value recurs in later blocks
    out = check_softmax(x)
    assert torch.isfinite(out).all()


def test_masked_logits(device):
    """-inf logits (masked positions), including a leading block of them, get probability 0."""
    x = torch.randn(3, 3000, device=device)
    x[:, :2000] = float("-inf")
    out = check_softmax(x)
    assert torch.all(out[:, :2000] == 0)


def test_non_contiguous_input(device):
    x = torch.randn(40, 30, device=device).t()  # (30, 40), rows strided
    check_softmax(x)
    out = softmax(x)
    assert out.shape == x.shape


def test_rejects_bad_input(device):
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        softmax([1.0, 2.0])
    with pytest.raises(ValueError, match="at least one dimension"):
        softmax(torch.tensor(1.0))
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        softmax(torch.arange(4, device=device))
    with pytest.raises(ValueError, match="out must match x"):
        softmax(torch.randn(2, 3, device=device), out=torch.empty(3, 2, device=device))
