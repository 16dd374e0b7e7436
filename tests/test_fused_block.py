"""Fused block stages: the Triton kernels (interpreter on CPU) against their PyTorch references."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_fused_kernels_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    seed = str(int(torch.randint(0, 2**31 - 1, ()).item()))
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "_fused_interpreter_check.py"), seed],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_kernels_on_cuda() -> None:
    from kernels.fused_block import LN_MODULATE, add_ln, qk_norm_rope

    B, n, H, D = 2, 37, 16, 128
    C = H * D
    x, y = torch.randn(B, n, C, device="cuda"), torch.randn(B, n, C, device="cuda", dtype=torch.bfloat16)
    ada = torch.randn(B, 1, 6, C, device="cuda")
    for use in (True, False):
        out = add_ln(x, y, ada[:, :, 0], ln=LN_MODULATE, scale=ada[:, :, 1], shift=ada[:, :, 2],
                     out_dtype=torch.bfloat16, use_triton=use)
        if use:
            fused = out
    torch.testing.assert_close(fused[0], out[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1].float(), out[1].float(), rtol=2e-2, atol=2e-2)
    qkv = torch.randn(B, n, 3 * C, device="cuda", dtype=torch.bfloat16)
    ang = torch.rand(n, D // 2, device="cuda") * 6
    hs = torch.rand(1, H, 1, 1, device="cuda") + 1
    caches = [torch.zeros(2, B, H, n + 3, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    qs = [qk_norm_rope(qkv, H, hs, ang.cos(), ang.sin(), c[0][:, :, 3:], c[1][:, :, 3:], use_triton=u)
          for c, u in zip(caches, (True, False))]
    torch.testing.assert_close(qs[0].float(), qs[1].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(caches[0].float(), caches[1].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_group_norm_silu_on_cuda() -> None:
    from kernels.group_norm import group_norm_silu

    x = (torch.randn(1, 128, 96, 80, device="cuda") * 2 + 0.5).bfloat16().contiguous(memory_format=torch.channels_last)
    w, b = 1 + 0.1 * torch.randn(128, device="cuda"), 0.1 * torch.randn(128, device="cuda")
    y = group_norm_silu(x, 32, w.bfloat16(), b.bfloat16(), 1e-6)
    ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x.float(), 32, w, b, 1e-6))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
