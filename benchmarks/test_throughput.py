"""Smoke tests of benchmarks/throughput.py: every code path on tiny sizes (its numbers there are not results), on the
CPU and, under `pytest -m gpu`, on a CUDA GPU."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", "Unknown pytest.mark.gpu", pytest.PytestUnknownMarkWarning)  # no config file
BENCHMARK = Path(__file__).resolve().with_name("throughput.py")


def run_smoke(tmp_path, device: str) -> dict:
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(BENCHMARK), "--smoke", "--device", device, "--workers", "2", "--json",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    h = result["header"]
    assert h["commit"] and h["device"] and h["cpu"]["cores"] >= 1 and h["threads"]["torch_intra_op"] == 1
    assert h["versions"]["torch"] == torch.__version__ and "cudnn" in h["versions"] and h["wall_s"] > 0
    assert {(r["step"], r["pipeline"]) for r in result["rows"]} >= {
        ("augmentation", "usual (2 workers)"), ("augmentation", "ssl_min"), ("train", "usual (2 workers)"),
        ("train", "ssl_min")}
    for r in result["rows"]:
        assert 0 < r["views_per_s_min"] <= r["views_per_s"] <= r["views_per_s_max"], r
    assert min(r["waves"] for r in result["rows"] if r["step"] == "augmentation" and "waves" in r) >= 10
    lean, reference = result["probe"]
    assert lean["seconds"] > 0 and reference["seconds"] > 0 and lean["accuracy"] > 0.3  # above chance (10%)
    # Same computation, different kernels: at most one of the test samples may be classified differently.
    assert abs(lean["accuracy"] - reference["accuracy"]) <= 1 / lean["test_samples"] + 1e-9
    phases = result["profile"]["phases"]
    assert {p["phase"] for p in phases} == {"augmentation", "forward", "loss", "backward", "optimizer step"}
    assert sum(p["share"] for p in phases) == pytest.approx(1)
    assert len(result["ratios"]) >= 3 and all(line in done.stdout for line in result["ratios"])
    return result


def test_benchmark_smoke_records_provenance_positive_rates_and_equal_probes(tmp_path):
    """About 15 s on 2 CPU cores."""
    run_smoke(tmp_path, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled row")
def test_benchmark_smoke_on_cuda_has_the_compiled_row(tmp_path):
    result = run_smoke(tmp_path, "cuda")
    compiled = [r for r in result["rows"] if r["pipeline"] == "ssl_min, compiled"]
    assert len(compiled) == 1 and compiled[0]["first_call_s"] > 0 and compiled[0]["vs_eager"] > 0
    assert result["profile"]["compile"] and all(r["peak_mem_gib"] > 0 for r in result["rows"])


def test_memory_estimate_runs_and_grows_with_the_batch():
    script = BENCHMARK.with_name("memory.py")
    totals = []
    for batch in (64, 128):
        done = subprocess.run([sys.executable, str(script), "--batch-size", str(batch), "--views", "2", "--width", "16",
                               "--probe-views", "2", "--images", "100"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        line = next(line for line in done.stdout.splitlines() if "activations" in line)
        totals.append(float(line.split()[-2]))
    assert 0 < totals[0] < totals[1]
