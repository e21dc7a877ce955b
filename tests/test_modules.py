"""Triton-backed modules: drop-in twins of the reference modules."""
import copy

import pytest
import torch

import modules
import reference
from tests.helpers import GRADIENT_FACTOR, assert_close_to_reference

D_IN, D_OUT, CONTEXT = 24, 48, 64

# (twin, reference, constructor kwargs, extra forward inputs). Shapes are small
# because the CPU runs the kernels under the interpreter; 19 and 11 tokens are
# ragged against every block size.
TWINS = [
    pytest.param(modules.SelfAttention, reference.SelfAttentionV2, dict(d_in=D_IN, d_out=D_OUT), False, id="self"),
    pytest.param(modules.CausalAttention, reference.CausalAttention,
                 dict(d_in=D_IN, d_out=D_OUT, context_length=CONTEXT, dropout=0.0), False, id="causal"),
    pytest.param(modules.CrossAttention, reference.CrossAttention,
                 dict(d_in=D_IN, d_context=16, d_out=D_OUT), True, id="cross"),
    pytest.param(modules.MultiHeadAttention, reference.MultiHeadAttention,
                 dict(d_in=D_IN, d_out=D_OUT, context_length=CONTEXT, dropout=0.0, num_heads=4), False, id="mha"),
    pytest.param(modules.FusedQKVMultiHeadAttention, reference.FusedQKVMultiHeadAttention,
                 dict(d_in=D_IN, d_out=D_OUT, context_length=CONTEXT, dropout=0.0, num_heads=4), False,
                 id="fused-qkv"),
    pytest.param(modules.GroupedQueryAttention, reference.GroupedQueryAttention,
                 dict(d_in=D_IN, d_out=D_OUT, num_heads=4, num_kv_groups=2, context_length=CONTEXT), False, id="gqa"),
    pytest.param(modules.MultiQueryAttention, reference.MultiQueryAttention,
                 dict(d_in=D_IN, d_out=D_OUT, num_heads=4, context_length=CONTEXT), False, id="mqa"),
]


def make_inputs(needs_context, device, dtype=torch.float32):
    x = torch.randn(2, 19, D_IN, device=device, dtype=dtype)
    return (x, torch.randn(2, 11, 16, device=device, dtype=dtype)) if needs_context else (x,)


@pytest.mark.parametrize("twin_cls, reference_cls, kwargs, needs_context", TWINS)
def test_state_dict_round_trip(twin_cls, reference_cls, kwargs, needs_context, device):
    ref = reference_cls(**kwargs).to(device)
    twin = twin_cls(**kwargs).to(device)
    twin.load_state_dict(ref.state_dict())  # strict: the same keys, the same shapes
    back = reference_cls(**kwargs).to(device)
    back.load_state_dict(twin.state_dict())
    for name, tensor in ref.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def check_twin(twin_cls, reference_cls, kwargs, needs_context, backend, dtype, device):
    """Loaded with the reference weights, the twin gives the reference output and gradients."""
    ref = reference_cls(**kwargs).to(device, dtype)
    twin = twin_cls(**kwargs, backend=backend).to(device, dtype)
    twin.load_state_dict(ref.state_dict())
    ref64 = copy.deepcopy(ref).double()

    inputs = make_inputs(needs_context, device)
    grad_out = torch.randn(2, 19, D_OUT, device=device)
    results = {}
    for label, module, run_dtype in (("twin", twin, dtype), ("torch", ref, dtype), ("f64", ref64, torch.float64)):
        leaves = [t.detach().to(run_dtype).requires_grad_() for t in inputs]
        out = module(*leaves)
        out.backward(grad_out.to(run_dtype))
        results[label] = [out] + [t.grad for t in leaves] + [p.grad for p in module.parameters()]
        module.zero_grad()
    names = ["output"] + [f"d_input{i}" for i in range(len(inputs))] + [n for n, _ in twin.named_parameters()]
    for i, name in enumerate(names):
        factor = 2.0 if i == 0 else GRADIENT_FACTOR
        assert_close_to_reference(results["twin"][i], results["f64"][i], results["torch"][i], factor=factor,
                                  name=f"{backend} {dtype}: {name}")


@pytest.mark.parametrize("backend", modules.BACKENDS)
@pytest.mark.parametrize("twin_cls, reference_cls, kwargs, needs_context", TWINS)
def test_output_and_gradients_match_reference(twin_cls, reference_cls, kwargs, needs_context, backend, device):
    check_twin(twin_cls, reference_cls, kwargs, needs_context, backend, torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("twin_cls, reference_cls, kwargs, needs_context", TWINS)
def test_low_precision_on_triton(twin_cls, reference_cls, kwargs, needs_context, dtype, device):
    """The whole module in fp16/bf16: weights, activations, the kernel, and all gradients."""
    check_twin(twin_cls, reference_cls, kwargs, needs_context, "triton", dtype, device)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of 'triton', 'sdpa', 'naive'; got 'cuda'"):
        modules.GroupedQueryAttention(D_IN, D_OUT, 4, 2, CONTEXT, backend="cuda")


class TinyLM(torch.nn.Module):
    """Embedding -> Llama-style GQA block -> vocabulary head: the smallest model worth training."""

    def __init__(self, backend, vocab=11, d_model=32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d_model)
        self.attn = modules.GroupedQueryAttention(d_model, d_model, num_heads=4, num_kv_groups=2,
                                                  context_length=32, rope_theta=10_000.0, backend=backend)
        self.head = torch.nn.Linear(d_model, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        return self.head(x + self.attn(x))


def train_losses(backend, device, steps=12):
    """Train on a toy task: predict the token seen 3 positions earlier (needs attention to solve)."""
    torch.manual_seed(0)
    model = TinyLM(backend).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 11, (8, 24), device=device)
    losses = []
    for _ in range(steps):
        logits = model(tokens)[:, 3:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), tokens[:, :-3].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_training_loss_curves_agree(device):
    triton_losses = train_losses("triton", device)
    naive_losses = train_losses("naive", device)
    assert triton_losses[-1] < 0.8 * triton_losses[0], f"the model did not learn: {triton_losses.tolist()}"
    # Same seed, same data: the two curves differ only by fp32 rounding, amplified a little by Adam.
    torch.testing.assert_close(triton_losses, naive_losses, rtol=1e-4, atol=1e-5)
