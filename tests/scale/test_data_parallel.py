"""Data parallel training gives the single-device result: 4 devices (replicated and FSDP-sharded
frozen weights) and two processes on localhost (CPU collectives), each in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import free_port, host_devices_env

pytestmark = pytest.mark.slow  # trains or starts subprocesses

WORKER = Path(__file__).with_name("worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _start(out, devices, *extra):
    return subprocess.Popen([sys.executable, str(WORKER), str(out), *extra], env=host_devices_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp")
    procs = [_start(d / "one.npz", 1), _start(d / "four.npz", 4), _start(d / "fsdp.npz", 4, "--shard-frozen")]
    for p in procs:
        _wait(p)
    port = str(free_port())
    multi = [_start(d / "multi.npz", 2, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                    "--process-id", str(i)) for i in (1, 0)]
    for p in multi:
        _wait(p)
    return {name: dict(np.load(d / f"{name}.npz")) for name in ("one", "four", "fsdp", "multi")}


def _same(a, b):
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-5)
    keys = [k for k in a if k not in ("losses", "devices", "processes")]
    assert keys and set(keys) == {k for k in b if k not in ("losses", "devices", "processes")}
    moved = max(float(np.abs(a[k]).max()) for k in keys if k.endswith("/b"))
    assert moved > 1e-3  # the adapter trained (B starts at zero)
    for k in keys:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("name,devices,processes", [("four", 4, 1), ("fsdp", 4, 1), ("multi", 4, 2)])
def test_matches_single_device(runs, name, devices, processes):
    assert int(runs["one"]["devices"]) == 1
    assert int(runs[name]["devices"]) == devices and int(runs[name]["processes"]) == processes
    _same(runs["one"], runs[name])
