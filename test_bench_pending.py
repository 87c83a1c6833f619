"""Tests of benchmarks/throughput.py, to be merged into test_ssl_min.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent


def run_smoke(tmp_path, *options) -> dict:
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--smoke", "--json", str(out),
                           *options], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    h = result["header"]
    assert h["commit"] and h["device"] and h["cpu"]["model"] and h["cpu"]["cores"] >= 1
    assert h["versions"]["torch"] == torch.__version__ and "cuda" in h["versions"] and "cudnn" in h["versions"]
    assert h["threads"]["torch_intra_op"] == 1 and h["threads"]["dataloader_workers"] >= 1
    assert len(h["load_average_start"]) == 3 and h["wall_s"] > 0
    assert {(r["step"], r["pipeline"].split()[0]) for r in result["rows"]} >= {
        ("augmentation", "usual"), ("augmentation", "ssl_min"), ("train", "usual"), ("train", "ssl_min")}
    for r in result["rows"]:
        assert 0 < r["views_per_s_min"] <= r["views_per_s"] <= r["views_per_s_max"], r
    assert min(r["waves"] for r in result["rows"] if r["step"] == "augmentation" and "waves" in r) >= 10
    assert all(r["workers_to_match"] > 0 for r in result["rows"] if r["pipeline"] == "ssl_min")
    lean, reference = result["probe"]
    assert lean["seconds"] > 0 and reference["seconds"] > 0 and lean["accuracy"] > 0.3  # above chance (10%)
    # Same computation, different kernels: at most one of the test samples may be classified differently.
    assert abs(lean["accuracy"] - reference["accuracy"]) <= 1 / lean["test_samples"] + 1e-9
    phases = {p["phase"] for p in result["profile"]["phases"]}
    assert phases == {"augmentation", "forward", "loss", "backward", "optimizer step"}
    assert abs(sum(p["share"] for p in result["profile"]["phases"]) - 1) < 1e-6
    assert result["ratios"] and h["commit"] in done.stdout and "| step | input pipeline |" in done.stdout
    return result


def test_benchmark_smoke_records_provenance_positive_rates_and_equal_probes(tmp_path):
    """benchmarks/throughput.py --smoke: every CPU code path in about 15 s on 2 cores."""
    run_smoke(tmp_path, "--device", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the fused Adam and compiled rows")
def test_benchmark_smoke_on_cuda_has_the_fused_adam_and_compiled_rows(tmp_path):
    result = run_smoke(tmp_path, "--device", "cuda")
    assert result["header"]["versions"]["cudnn"] and result["profile"]["compile"]
    extras = {r["pipeline"]: r for r in result["rows"] if "vs_eager" in r}
    assert set(extras) == {"ssl_min, fused Adam", "ssl_min, compiled", "ssl_min, compiled, fused Adam"}
    assert extras["ssl_min, compiled"]["first_call_s"] > 0
    assert all(r["peak_mem_gib"] > 0 for r in result["rows"])
