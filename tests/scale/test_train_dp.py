"""`lora train`'s loop data parallel over 2 (forced host) devices logs the 1-device run's losses."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import host_devices_env

# The demo through flax_lora.training.loop.train (what `lora train` runs), ROUGE off to keep it short.
SCRIPT = """
import sys
from flax_lora.training.parallel import init_distributed
init_distributed()
from flax_lora.training.loop import train
from tests.helpers import run_config
cfg = run_config(None, None, sys.argv[1], max_steps=6, log_every=2, batch_size=int(sys.argv[2]), grad_accum=2,
                 rouge_examples=0, eval_every=0, save_every=0, seed=3, shard_frozen=sys.argv[3] == "shard")
train(cfg, quiet=True)
"""


pytestmark = pytest.mark.slow  # trains or starts subprocesses

def _run(out, devices, batch_size, shard=False):
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(out), str(batch_size), "shard" if shard else "copy"],
                            env=host_devices_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_devices_log_the_single_device_losses(tmp_path):
    from flax_lora.adapters.native import load_adapter
    from flax_lora.training.rundir import RunDir

    # same global batch: 4 x 2; "sharded": frozen weights split over the 2 devices (--shard-frozen)
    procs = {1: _run(tmp_path / "one", 1, 4), 2: _run(tmp_path / "two", 2, 2), "sharded": _run(tmp_path / "sharded", 2, 2, True)}
    for p in procs.values():
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
    runs = {n: RunDir(tmp_path / {1: "one", 2: "two"}.get(n, n)) for n in procs}
    losses = {n: [(r["step"], r["loss"]) for r in rd.read_metrics() if "loss" in r] for n, rd in runs.items()}
    assert [s for s, _ in losses[1]] == [2, 4, 6] == [s for s, _ in losses[2]] == [s for s, _ in losses["sharded"]]
    np.testing.assert_allclose([l for _, l in losses[2]], [l for _, l in losses[1]], rtol=1e-5)
    np.testing.assert_allclose([l for _, l in losses["sharded"]], [l for _, l in losses[1]], rtol=1e-5)
    for n, rd in runs.items():
        resolved = rd.load_resolved()
        devices = 2 if n == "sharded" else n
        assert resolved.devices == devices and resolved.effective_batch_size == 8
        assert json.loads(rd.eval.read_text())["devices"] == devices
    assert runs["sharded"].load_config().shard_frozen is True
    assert json.loads(runs["sharded"].eval.read_text())["after"]["loss"] == pytest.approx(
        json.loads(runs[2].eval.read_text())["after"]["loss"], rel=1e-4)
    a, _, _, _ = load_adapter(runs[1].adapter)
    b, _, _, _ = load_adapter(runs[2].adapter)
    import jax

    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5)
