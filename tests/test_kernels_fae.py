"""Flash Attention Entropy: the chunked reference and the Triton kernel (interpreter on CPU)
against float64 attention; sharp and flat rows; the runtime's attention entry point, whose
entropy comes beside SDPA's unchanged output (from its log-sum-exp) or from the FAE kernel."""

from __future__ import annotations

import math

import pytest
import torch

from tests.commands import run_interpreter_check
from toprovar.attention import ENTROPY_KERNELS, attention, entropy_kernel, prefer_cudnn_attention
from toprovar.errors import UserError
from toprovar.kernels import flash_attn_entropy, lse_entropy, sdpa_entropy
from toprovar.kernels.reference import attention_entropy_reference, entropy_reference, naive_attention_entropy
from toprovar.kernels.sdpa import sdpa_with_lse


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _exact(q, k, v, scale):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    p = torch.softmax(s, -1)
    return p @ v.double(), -(p * torch.log(p)).sum(-1)


@pytest.mark.parametrize("Lq, Lk, D", [(13, 50, 16), (31, 31, 64), (9, 77, 128)])
def test_reference_streams_keys_exactly(Lq, Lk, D) -> None:
    q, k, v = torch.randn(2, 3, Lq, D), torch.randn(2, 3, Lk, D), torch.randn(2, 3, Lk, D)
    scale = D**-0.5 * float(torch.rand(()) + 0.5)
    out, ent = attention_entropy_reference(q, k, v, scale, chunk=7)  # many ragged chunks
    ref_out, ref_ent = _exact(q, k, v, scale)
    assert ent.dtype == torch.float32 and ent.shape == (2, 3, Lq) and out.shape == q.shape
    assert _rel(out, ref_out) <= 1e-5 and _rel(ent, ref_ent) <= 1e-5
    naive_out, naive_ent = naive_attention_entropy(q, k, v, scale)
    assert _rel(naive_ent, ref_ent) <= 1e-5 and _rel(naive_out, ref_out) <= 1e-5


def test_reference_flat_and_sharp_rows() -> None:
    Lk = 40
    k, v = torch.nn.functional.normalize(torch.randn(1, 2, Lk, 32), dim=-1), torch.randn(1, 2, Lk, 32)
    _, flat = attention_entropy_reference(torch.zeros(1, 2, 5, 32), k, v, chunk=16)
    assert torch.allclose(flat, torch.full_like(flat, math.log(Lk)), atol=1e-6)
    sharp_q = k[:, :, [3, 17, 39]] * 300.0
    _, sharp = attention_entropy_reference(sharp_q, k, v, 1.0, chunk=16)
    assert sharp.max() < 1e-4 and sharp.min() >= -1e-6


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the Triton interpreter is the CPU stand-in for the GPU; with a "
    "GPU the compiled kernel is tested (test_triton_on_gpu), and triton 3.6's interpreter "
    "cannot take runtime loop bounds with new NumPy",
)
def test_triton_kernel_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    run = run_interpreter_check("_fae_interpreter_check.py")
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("kernel", list(ENTROPY_KERNELS))
def test_runtime_attention_routes_entropy_to_the_kernel_api(kernel: str) -> None:
    q, k, v = torch.randn(1, 4, 10, 32), torch.randn(1, 4, 25, 32), torch.randn(1, 4, 25, 32)
    with entropy_kernel(kernel):
        out, ent = attention(q, k, v, entropy=True, scale=0.3)
    ref_out, ref_ent = _exact(q, k, v, 0.3)
    assert _rel(out, ref_out) <= 1e-5 and _rel(ent, ref_ent) <= 1e-5
    plain, none = attention(q, k, v, entropy=False, scale=0.3)
    assert none is None and _rel(plain, ref_out) <= 1e-5
    torch.testing.assert_close(flash_attn_entropy(q, k, v, 0.3)[1], ent)
    assert torch.equal(out, plain) == (kernel == "beside")  # FAE's output rounds its own way here
    with pytest.raises(UserError, match="entropy kernel 'flash'"):
        with entropy_kernel("flash"):
            pass


# (rows, heads, queries, keys, head dim) as the models call attention: one token, a first scale,
# a middle scale over its KV-cache prefix, a last one; test-small (D 32) and tiny (3 heads, D 64).
MODEL_SHAPES = [(4, 2, 1, 1, 32), (4, 2, 4, 5, 32), (16, 3, 36, 91, 64), (16, 3, 64, 155, 64), (8, 3, 256, 411, 64)]


@pytest.mark.parametrize("B, H, Lq, Lk, D", MODEL_SHAPES)
def test_entropy_beside_leaves_sdpas_output_bit_for_bit(B, H, Lq, Lk, D) -> None:
    """attention(entropy=True) returns the very bits of attention(entropy=False), whatever the
    query layout (the blocks hand it views of (B, L, H, D) projections), and the exact entropy:
    on CPU bit for bit the one the FAE path (its chunked reference) gave."""
    for _ in range(3):
        q = torch.randn(B, Lq, H, D).transpose(1, 2)  # a view, as the blocks make it
        k, v = torch.randn(B, H, Lk, D), torch.randn(B, H, Lk, D)
        scale = float(torch.rand(()) + 0.5) * D**-0.5 * 4
        out, ent = attention(q, k, v, entropy=True, scale=scale)
        plain, _ = attention(q, k, v, entropy=False, scale=scale)
        assert torch.equal(out, plain) and torch.equal(
            out, attention(q.contiguous(), k, v, entropy=False, scale=scale)[0]
        )
        _, exact = _exact(q, k, v, scale)
        assert torch.equal(ent, flash_attn_entropy(q, k, v, scale)[1])  # on CPU: the reference's bits
        assert ent.dtype == torch.float32 and ent.shape == (B, H, Lq)
        assert (ent.double() - exact).abs().max() <= 1e-5 * max(1.0, exact.abs().max().item())


def test_sdpa_with_lse_returns_sdpas_output_and_its_log_sum_exp() -> None:
    q, k, v = torch.randn(2, 3, 17, 32), torch.randn(2, 3, 40, 32), torch.randn(2, 3, 40, 32)
    out, lse = sdpa_with_lse(q, k, v, 0.7)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.7))
    exact = torch.logsumexp(0.7 * q.double() @ k.double().transpose(-1, -2), -1)
    assert lse.dtype == torch.float32 and (lse.double() - exact).abs().max() <= 1e-5


@pytest.mark.parametrize("chunk", [7, 1024])
def test_entropy_reference_is_the_references_entropy_bit_for_bit(chunk: int) -> None:
    """The pass without V computes the entropy with the reference's very operations (so on CPU
    the decisions read the same numbers as with the FAE path), on flat, sharp and random rows."""
    q, k, v = torch.randn(2, 3, 11, 32), torch.randn(2, 3, 40, 32), torch.randn(2, 3, 40, 32)
    kn = torch.nn.functional.normalize(k, dim=-1)
    for qq, kk, scale in [(q, k, 0.4), (torch.zeros_like(q), k, 0.4), (kn[:, :, [3, 17, 39]] * 300.0, kn, 1.0)]:
        assert torch.equal(
            entropy_reference(qq, kk, scale, chunk), attention_entropy_reference(qq, kk, v, scale, chunk)[1]
        )


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="expected q"):
        flash_attn_entropy(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: SDPA's GPU backends and the Triton entropy kernel"
)
@pytest.mark.parametrize("cudnn", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_entropy_beside_sdpa_on_gpu(dtype, cudnn: bool) -> None:
    """On the GPU too, the output with entropy is SDPA's bit for bit (cuDNN first as the fast path
    asks, or SDPA's own order), at Infinity's shapes (16 and 28 heads... here 16, D 128)."""
    for Lq, Lk in [(1, 1), (4, 5), (256, 341), (1024, 1365), (4096, 10521)]:
        q = torch.randn(2, Lq, 16, 128, device="cuda", dtype=dtype).transpose(1, 2)
        k, v = [torch.randn(2, 16, Lk, 128, device="cuda", dtype=dtype) for _ in range(2)]
        with prefer_cudnn_attention(cudnn):
            out, ent = sdpa_entropy(q, k, v)
            plain, _ = attention(q, k, v, entropy=False)
        assert torch.equal(out, plain), (Lq, Lk)
        _, ref_ent = _exact(q, k, v, 128**-0.5)
        # one key: the exact entropy is 0, so the error is measured against 1 nat, not relatively
        assert (ent.double() - ref_ent).norm() <= 1e-2 * max(ref_ent.norm().item(), 1.0), (Lq, Lk)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the Triton path runs only on GPU tensors")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_on_gpu(dtype) -> None:
    q, k, v = [torch.randn(2, 4, L, 128, device="cuda", dtype=dtype) for L in (300, 1000, 1000)]
    out, ent = flash_attn_entropy(q, k, v)
    ref_out, ref_ent = _exact(q, k, v, 128**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel(out, ref_out) <= tol and _rel(ent, ref_ent) <= tol
    lse = torch.logsumexp(128**-0.5 * q.float() @ k.float().transpose(-1, -2), -1)
    assert _rel(lse_entropy(q, k, lse), ref_ent) <= tol  # the entropy-only kernel
