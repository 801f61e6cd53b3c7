"""flax_lora.perf.trace (behind benchmarks/trace_summary.py): self times (nested events counted
once), kinds, and a real trace of the benchmark's train step on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flax_lora.perf import trace as ts
from tests.helpers import ROOT


def test_nested_events_are_counted_once():
    # a while loop [0, 100) around two ops; a separate op after it
    events = [(0, 100, "while.1"), (10, 40, "dot.1"), (50, 80, "copy.2"), (120, 130, "fusion.3")]
    got = dict(ts.self_times(events))
    assert got == {"while.1": 40, "dot.1": 30, "copy.2": 30, "fusion.3": 10}
    assert sum(got.values()) == 110  # busy time, not 170


def test_deeper_nesting_and_equal_starts():
    events = [(0, 100, "outer"), (0, 60, "inner"), (0, 20, "leaf"), (70, 90, "b")]
    got = dict(ts.self_times(events))
    assert got == {"outer": 20, "inner": 40, "leaf": 20, "b": 20}


@pytest.mark.parametrize("name,kind", [
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT", "matmul"), ("ynn_fusion.39", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7", "attention"), ("copy_bitcast_fusion.13", "copy/transpose"),
    ("transpose.4", "copy/transpose"), ("loop_multiply_fusion", "fusion"), ("ncclDevKernel_AllReduce_Sum_f32", "collective"),
    ("wrapped_broadcast.6", "other"),
])
def test_kinds(name, kind):
    assert ts.kind_of(name) == kind


@pytest.mark.slow
def test_bench_profile_on_cpu(tmp_path):
    """bench.py --profile traces the real step; on CPU the XLA ops are attributed, matmuls first."""
    out = tmp_path / "r.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_enable_xprof_traceme=true",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--preset", "tiny",
                           "--precision", "fp32", "--steps", "1", "--warmup", "0", "--profile", str(tmp_path / "trace"),
                           "--json", str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["ours"]["fp32"]
    kinds = res["profile_kinds_ms"]
    assert kinds["matmul"] > 0 and sum(kinds.values()) > 0
    assert res["profile_top"] and all(len(k) == 4 for k in res["profile_top"])
    assert "by kind: " in proc.stderr

    # the command line reads the same trace
    cli = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trace_summary.py"), str(tmp_path / "trace"),
                          "--steps", "3", "--top", "5"], capture_output=True, text=True, timeout=120, env=env)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "by kind: " in cli.stdout and len(cli.stdout.splitlines()) == 3 + 5
