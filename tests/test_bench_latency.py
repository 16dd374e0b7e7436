"""`python -m benchmarks.latency --smoke`: the latency benchmark's code path on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import latency as bench_latency
from toprovar.errors import UserError


def test_smoke_runs_every_variant_and_checks(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert bench_latency.main(["--smoke", "--json-out", str(out), "--md-out", str(tmp_path / "bench.md")]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert json.loads(printed.strip().splitlines()[-1]) == result
    for key in ("device", "torch", "triton", "date", "command", "matmul_tflops"):
        assert key in result
    r = result["backbones"]["test-small"]
    names = [name for name, _ in bench_latency.variants(ablations=False)]  # the default set
    assert list(r["variants"]) == names
    assert all("median_s" in v and len(v["per_scale_ms"]) == 7 for v in r["variants"].values())
    assert r["variants"][bench_latency.FAST_NAME]["runtime"]["graph_loop"]
    assert check_vae_ok(r["check"]["vae_rel_err"])
    assert r["floor"]["floor_s"] > 0
    check = r["check"]  # CPU: every variant is the float32 eager arithmetic
    assert check["graph_bits_equal_eager_fused"]
    for name in ("plain bf16", "fused eager bf16", "fast (graphs) bf16"):
        assert min(check[name]["bits_agree"]) == 1.0
    assert max(check["fused eager bf16"]["logits_rel_err"]) == 0.0
    md = (tmp_path / "bench.md").read_text()
    assert "| plain |" in md and f"guidance scale 3, temperature {r['temperature']}" in md


def check_vae_ok(v: dict) -> bool:  # CPU: the decode ignores the CUDA switches
    errs = [v["plain bf16"], v["NHWC bf16"], v["NHWC fused GroupNorm bf16"]]
    return len(set(errs)) == 1 and errs[0] < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_cuda_says_so() -> None:
    with pytest.raises(UserError, match="needs a CUDA GPU.*--smoke"):
        bench_latency.main([])


def test_batch_benchmark_smoke_writes_one_row_per_batch(tmp_path, monkeypatch) -> None:
    """`python -m benchmarks.batch --smoke`: the batching benchmark's code path on CPU."""
    from benchmarks import batch as bench_batch

    out = tmp_path / "batch.json"
    monkeypatch.setattr(
        "sys.argv",
        ["bench_batch", "--smoke", "--batches", "1,2", "--warmup", "0", "--reps", "1", "--json-out", str(out)],
    )
    bench_batch.main()
    record = json.loads(out.read_text())
    assert [r["batch"] for r in record["rows"]] == [1, 2]
    assert all(r["ms_per_image"] > 0 and 0 < r["floor_fraction"] for r in record["rows"])


def test_profile_scales_traces_the_first_and_last_scale(small) -> None:
    """`--profile-scales` on CPU: the first and the last scale, each a sequence of non-overlapping
    operators whose busy time and gaps add up to the span."""
    from benchmarks.latency import profile_markdown, profile_scales

    scales = profile_scales(small, reps=1)
    n_scales = len(small.fast_runtime.state.buffers.tokens)
    assert list(scales) == ["scale 0", f"scale {n_scales - 1}"] and scales["scale 0"]["tokens"] == 1
    for p in scales.values():
        assert p["kernels"] > 0 and 0 < p["busy_ms"] <= p["span_ms"]
        assert p["busy_ms"] + p["gaps_ms"] == pytest.approx(p["span_ms"], rel=1e-6, abs=1e-6)
        assert len(p["top"]) == min(5, p["kernels"]) and p["trace_scale_ms"] > 0
    assert "| scale 0 | 1 |" in profile_markdown("test-small", scales)
