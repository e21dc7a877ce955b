"""Bad input to the kernels gets a clear error that names the argument, never a crash inside."""
import pytest
import torch

import kernels.runtime
from conftest import DEVICE
from kernels import flash_attention, softmax


def qkv(batch=1, h_q=4, h_kv=2, n_q=8, n_k=8, head_dim=16, dtype=torch.float32, device=DEVICE):
    def rand(h, n):
        return torch.randn(batch, h, n, head_dim, dtype=dtype, device=device)
    return rand(h_q, n_q), rand(h_kv, n_k), rand(h_kv, n_k)


def test_rank_must_be_4():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q must have rank 4"):
        flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k must have rank 4"):
        flash_attention(q, k[0], v)


def test_batch_and_head_dim_must_match():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="same batch size"):
        flash_attention(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1))
    q2, _, _ = qkv(head_dim=32)
    with pytest.raises(ValueError, match="same head_dim"):
        flash_attention(q2, k, v)


def test_query_heads_must_be_a_multiple_of_kv_heads():
    q, k, v = qkv(h_q=3, h_kv=2)
    with pytest.raises(ValueError, match="multiple of the number of kv heads"):
        flash_attention(q, k, v)


def test_k_and_v_must_have_one_length():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        flash_attention(q, k, v[:, :, :5])


def test_dtype_and_device_must_match():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="k has dtype torch.float16 but q has torch.float32"):
        flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match=f"v is on meta but q is on {DEVICE}"):
        flash_attention(q, k, v.to("meta"))


def test_unsupported_dtype():
    q, k, v = (t.to(torch.int32) for t in qkv())
    with pytest.raises(TypeError, match="q has dtype torch.int32"):
        flash_attention(q, k, v)


def test_head_dim_at_most_256():
    q, k, v = qkv(head_dim=257)
    with pytest.raises(ValueError, match="head_dim .* between 1 and 256"):
        flash_attention(q, k, v)


def test_sm_scale_must_be_a_number():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="sm_scale"):
        flash_attention(q, k, v, sm_scale="0.1")


def test_cpu_tensors_without_the_interpreter_say_how_to_run(monkeypatch):
    monkeypatch.setattr(kernels.runtime, "INTERPRET", False)
    q, k, v = qkv(device="cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        flash_attention(q, k, v)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        softmax(q)


@pytest.mark.gpu
def test_float64_head_dim_above_128_is_refused_on_a_gpu():
    q, k, v = qkv(head_dim=160, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match="float64 inputs support head_dim up to 128"):
        flash_attention(q, k, v)
