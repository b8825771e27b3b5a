"""Smoke test of the benchmark suite: `python -m benchmarks all --quick` runs end to end on a CPU.

It checks that every benchmark runs and reports, not how fast anything is; peers are switched off
(`--no-peers`), as in CI where the `bench` extra is not installed, and must show up as skipped.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_quick_runs_without_peers(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "all", "--quick", "--no-peers", "--threads", "1"]
        + ["--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for heading in ("1. Top-k", "2. One HVP", "3. Per-example", "4. Probe overhead", "5. Cost against"):
        assert heading in proc.stdout
    results = json.loads(out.read_text())
    eigen = results["eigen"]["rows"]
    probe_rows = [r for r in eigen if r["tool"] == "sgdprobe"]
    assert probe_rows and all("seconds" in r and r["rel_error"] < 1e-3 for r in probe_rows)
    assert any(r["tool"] == "pyhessian" and "not available" in r["skipped"] for r in eigen)
    overhead = [r for task in results["overhead"]["tasks"] for r in task["rows"]]
    assert any(r["config"].startswith("cockpit") and "skipped" in r for r in overhead)
    assert all("seconds" in r for r in overhead if r["config"] in ("plain", "sgdprobe defaults, all plugins"))
    for r in results["hvp"]["rows"]:  # timed, or refused by the forward-over-reverse check (LayerNorm)
        if r["what"].startswith("sgdprobe"):
            assert "seconds" in r or (
                r["what"] == "sgdprobe forward_over_reverse" and "disagrees" in r["skipped"]
            ), r
    assert all("params" in r for r in results["scaling"]["rows"])


def test_diagnose_lanczos_runs(tmp_path):
    """`python -m benchmarks.diagnose lanczos` at a tiny size (the other diagnostics are full-size only)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.diagnose", "lanczos", "--params", "1000", "--steps", "5"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5 Lanczos steps at P=1,000" in proc.stdout
