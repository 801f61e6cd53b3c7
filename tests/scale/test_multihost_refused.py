"""lora train refuses a multi-process launch (one clear line, exit 2) instead of letting every
process write the same run directory."""

import os
import socket
import subprocess
import sys


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_are_refused(tmp_path):
    port = _port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, LORA_COORDINATOR=f"127.0.0.1:{port}", LORA_NUM_PROCESSES="2",
                   LORA_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "cli", "train", "--output", str(tmp_path / "run"),
                                       "--max-steps", "2", "--quiet"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err
        assert "does not yet write its run directory from one process" in err
        assert "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
