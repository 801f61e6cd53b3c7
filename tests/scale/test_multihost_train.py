"""`lora train` over two processes on localhost (CPU collectives, one device each) gives the
losses and adapter of one process with two devices, and process 0 alone writes the run folder.
A bad input on one process ends both with exit 2 (no process is left waiting)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import free_port, host_devices_env

pytestmark = pytest.mark.slow  # trains or starts subprocesses

ARGS = ["--max-steps", "6", "--batch-size", "2", "--grad-accum", "2", "--seed", "3", "--save-every", "3",
        "--eval-every", "0", "--rouge-examples", "0", "--quiet"]


def _lora(args, env):
    return subprocess.Popen([sys.executable, "-m", "cli", "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _two_processes(per_process_args):
    port = free_port()
    procs = []
    for pid, args in enumerate(per_process_args):
        env = dict(host_devices_env(1), LORA_COORDINATOR=f"127.0.0.1:{port}", LORA_NUM_PROCESSES="2", LORA_PROCESS_ID=str(pid),
                   HF_HUB_OFFLINE="1")
        procs.append(_lora(args, env))
    return [_finish(p) for p in procs]


def _finish(p):
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("mh")
    single = _lora(["--output", str(d / "one"), *ARGS], dict(host_devices_env(2), HF_HUB_OFFLINE="1"))
    multi = _two_processes([["--output", str(d / "two"), *ARGS]] * 2)
    one = _finish(single)
    assert one[0] == 0, one[2][-3000:]
    for code, _, err in multi:
        assert code == 0, err[-3000:]
    return d, one, multi


def test_two_processes_train_like_two_devices(runs):
    from flax_lora.adapters.native import load_adapter
    from flax_lora.training.rundir import RunDir

    d, _, _ = runs
    rds = {name: RunDir(d / name) for name in ("one", "two")}
    losses = {n: [(r["step"], r["loss"]) for r in rd.read_metrics() if "loss" in r] for n, rd in rds.items()}
    assert [s for s, _ in losses["two"]] == [s for s, _ in losses["one"]] and losses["one"]
    np.testing.assert_allclose([l for _, l in losses["two"]], [l for _, l in losses["one"]], rtol=1e-5)
    a, _, _, _ = load_adapter(rds["one"].adapter)
    b, _, _, _ = load_adapter(rds["two"].adapter)
    import jax

    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5)
    resolved = rds["two"].load_resolved()
    assert resolved.processes == 2 and resolved.devices == 2 and resolved.effective_batch_size == 8


def test_process_zero_alone_writes(runs):
    from flax_lora.training.rundir import RunDir

    d, _, multi = runs
    rd = RunDir(d / "two")
    steps = [r["step"] for r in rd.read_metrics() if "loss" in r]
    assert steps == sorted(set(steps))  # each logged step once: one writer
    assert rd.eval.is_file() and (rd.adapter / "adapter.json").is_file()
    assert sorted(p.name for p in rd.checkpoints.iterdir() if p.name.isdigit()) == ["3", "6"]
    assert not [p for p in rd.path.rglob("*") if "tmp" in p.name.lower()]  # no temporaries left behind
    # the summary line once (gloo, the CPU collectives library, prints its own "[Gloo] ..." line)
    outs = [[line for line in out.splitlines() if not line.startswith("[Gloo]")] for _, out, _ in multi]
    assert len(outs[0]) == 1 and json.loads(outs[0][0])["output"] == str(d / "two") and outs[1] == []


def test_resume_over_two_processes(runs):
    """The two-process run continues from its checkpoint with a larger step budget."""
    from flax_lora.training.rundir import RunDir

    d, _, _ = runs
    res = _two_processes([["--output", str(d / "two"), "--resume", "--max-steps", "8", "--quiet"]] * 2)
    for code, _, err in res:
        assert code == 0, err[-3000:]
    steps = [r["step"] for r in RunDir(d / "two").read_metrics() if "loss" in r]
    assert steps[-1] == 8 and steps == sorted(set(steps))


def test_a_missing_file_on_one_host_stops_both(runs, tmp_path):
    d, _, _ = runs
    model, data = d / "one" / "model", d / "one" / "data" / "train.jsonl"
    common = ["--model", str(model), "--max-steps", "2", "--quiet"]
    res = _two_processes([["--output", str(tmp_path / "r"), "--data", str(data), *common],
                          ["--output", str(tmp_path / "r"), "--data", str(tmp_path / "missing.jsonl"), *common]])
    (c0, _, e0), (c1, _, e1) = res
    assert (c0, c1) == (2, 2), (e0[-2000:], e1[-2000:])
    assert "missing.jsonl" in e1 and "process 1 of 2 stopped" in e0
    assert "Traceback" not in e0 + e1
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
