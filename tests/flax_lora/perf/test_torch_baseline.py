"""flax_lora.perf.torch_baseline: torch stays an optional, benchmark-only import; the baseline runs
in a subprocess and reports like our step."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from flax_lora.perf import torch_baseline
from flax_lora.perf.shapes import PRESETS
from tests.helpers import ROOT


def test_importing_the_baseline_imports_neither_torch_nor_jax():
    code = ("import sys, flax_lora.perf.torch_baseline; "
            "print(sorted(m for m in ('torch', 'peft', 'jax', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_a_failing_child_is_reported_not_raised():
    res = torch_baseline.run_torch_subprocess(PRESETS["tiny"], timeout=120, precision="fp32", no_such_argument=1)
    assert res["impl"] == "torch+peft" and res["error"]


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.skipif(not torch_baseline.torch_available(), reason="needs torch and peft")
def test_baseline_runs_in_a_subprocess():
    res = torch_baseline.run_torch_subprocess(PRESETS["tiny"], timeout=300, batch=1, seq=16, r=4, alpha=8.0,
                                              targets=["q_proj", "v_proj"], precision="fp32", steps=1, warmup=1)
    assert "error" not in res, res.get("error")
    assert res["impl"] == "torch+peft" and res["tokens_per_second"] > 0
    assert abs(res["loss"] - math.log(PRESETS["tiny"]["vocab"])) < 0.5
