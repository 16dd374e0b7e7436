"""Flash Attention Entropy: the chunked reference and the Triton kernel (interpreter on CPU)
against float64 attention; sharp and flat rows; the runtime's attention entry point."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toprovar.attention import attention
from toprovar.kernels import flash_attn_entropy
from toprovar.kernels.reference import attention_entropy_reference, naive_attention_entropy

ROOT = Path(__file__).resolve().parents[1]


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
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    seed = str(int(torch.randint(0, 2**31 - 1, ()).item()))
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_fae_interpreter_check.py"), seed],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_runtime_attention_routes_entropy_to_the_kernel_api() -> None:
    q, k, v = torch.randn(1, 4, 10, 32), torch.randn(1, 4, 25, 32), torch.randn(1, 4, 25, 32)
    out, ent = attention(q, k, v, entropy=True, scale=0.3)
    ref_out, ref_ent = _exact(q, k, v, 0.3)
    assert _rel(out, ref_out) <= 1e-5 and _rel(ent, ref_ent) <= 1e-5
    plain, none = attention(q, k, v, entropy=False, scale=0.3)
    assert none is None and _rel(plain, ref_out) <= 1e-5
    torch.testing.assert_close(flash_attn_entropy(q, k, v, 0.3)[1], ent)


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="expected q"):
        flash_attn_entropy(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the Triton path runs only on GPU tensors")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_on_gpu(dtype) -> None:
    q, k, v = [torch.randn(2, 4, L, 128, device="cuda", dtype=dtype) for L in (300, 1000, 1000)]
    out, ent = flash_attn_entropy(q, k, v)
    ref_out, ref_ent = _exact(q, k, v, 128**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel(out, ref_out) <= tol and _rel(ent, ref_ent) <= tol
