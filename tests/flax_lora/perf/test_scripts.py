"""The benchmark scripts are command lines over flax_lora.perf: they import the package (never
through ``sys.path``) and each one starts; gpu_run.sh's summary helper records and merges parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

BENCH = ROOT / "benchmarks"
CLIS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "gpu_summary.py")  # gpu_summary: gpu_run.sh's helper


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def test_no_sys_path_tricks():
    files = list(BENCH.glob("*.py")) + list((ROOT / "tests" / "flax_lora" / "perf").glob("*.py"))
    files = [f for f in files if f.name != "test_scripts.py"]
    assert files and not [f.name for f in files if "sys.path" in f.read_text()]


@pytest.mark.slow
@pytest.mark.parametrize("script", CLIS)
def test_script_help(script, tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                          timeout=120, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage:")


def test_gpu_summary_records_and_merges_parts(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    raw = tmp_path / "a.raw"
    ours = {"tokens_per_second": 1234.5, "mfu": 0.25, "peak_memory_gb": 3.5, "advisor_estimate_gb": 4.0,
            "first_step_seconds": 9.0, "recompiles_after_first_step": 0}
    raw.write_text(json.dumps({"ours": {"bf16": ours}, "torch": {}, "ratio": {}}))
    run = [sys.executable, str(BENCH / "gpu_summary.py")]
    subprocess.run([*run, "--part", "a", "0", str(raw), str(parts / "a.json"), "LORA_ATTENTION=auto"], check=True,
                   env=_env())
    subprocess.run([*run, "--part", "b", "124", str(tmp_path / "missing.raw"), str(parts / "b.json"), ""], check=True,
                   env=_env())
    out = subprocess.run([*run, str(parts), str(tmp_path / "results.json")], check=True, capture_output=True,
                         text=True, env=_env()).stdout
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["part"] for r in rows] == ["a", "b"] and "timed out" in rows[1]["error"]
    assert "1234" in out and "25.0%" in out and "LORA_ATTENTION=auto" in out and "b    ERROR" in out
