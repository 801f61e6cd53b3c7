"""Signals against a real `lora train` subprocess whose steps take seconds.

The first SIGTERM stops training within about one optimizer step (the host keeps at most one
step in flight) and saves a checkpoint; a second one ends the process within 2 s even while it
waits on the device, and leaves a run that resumes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import subprocess_env

pytestmark = pytest.mark.slow
SEQ, BATCH = 512, 4


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """A Llama big enough that one CPU step of 8 x 512 tokens takes seconds, with long rows."""
    from transformers import LlamaConfig

    from flax_lora import demo
    from flax_lora.models import hub
    from flax_lora.models.decoder import causal_lm_from_config

    d = tmp_path_factory.mktemp("slow")
    cfg = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=32, max_position_embeddings=1024, bos_token_id=1,
                      eos_token_id=1, pad_token_id=0)
    hub.save_pt_safetensors(d / "model", causal_lm_from_config(cfg, seed=0).params, cfg)
    demo.save_tokenizer(demo.build_tokenizer(), d / "model")
    rows = [{"prompt": " ".join(str((i * 7 + j) % 10) for j in range(SEQ - 20)), "completion": " one two"}
            for i in range(64)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _start(slow_model, out, env):
    args = ["--model", str(slow_model / "model"), "--data", str(slow_model / "train.jsonl"), "--output", str(out),
            "--max-steps", "100000", "--max-length", str(SEQ), "--batch-size", str(BATCH), "--grad-accum", "1",
            "--save-every", "0", "--eval-every", "0", "--log-every", "2", "--rouge-examples", "0", "--precision", "fp32", "-q"]
    return subprocess.Popen([sys.executable, "-m", "cli", "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _step_seconds_once_training(proc, out, timeout=300) -> float:
    """Wait for the first logged training row; the step time its throughput implies."""
    deadline = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
        train = [r for r in rows if "loss" in r]
        if train:
            return BATCH * SEQ / train[0]["tokens_per_second"]
        time.sleep(0.05)
    raise AssertionError("no training step logged in time")


def _terminate(proc, *, times: int, gap: float = 0.3) -> tuple[float, str]:
    """Send SIGTERM ``times`` times, ``gap`` seconds apart; (seconds from the last one to the exit, stderr)."""
    try:
        for i in range(times):
            if i:
                time.sleep(gap)
            t0 = time.time()
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        return time.time() - t0, err
    finally:
        if proc.poll() is None:
            proc.kill()


def _wait_for_a_row_after(proc, out, step: int, timeout=300) -> None:
    deadline = time.time() + timeout
    while not [r for r in _rows(out) if r.get("step", 0) > step and "loss" in r]:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)


def test_first_signal_stops_within_a_step_second_exits_at_once(slow_model, tmp_path, jax_cache):
    env = subprocess_env(jax_cache, JAX_PLATFORMS="cpu")
    out = tmp_path / "run"
    proc = _start(slow_model, out, env)
    step = _step_seconds_once_training(proc, out)
    time.sleep(step / 2)  # mid-step
    stopped, err = _terminate(proc, times=1)
    assert proc.returncode == 143, err[-3000:]
    # the step in flight, at most one queued behind it, then the checkpoint and the exit
    assert stopped < 2 * step + 8, (stopped, step)
    assert f"Continue with: lora train --output {out} --resume" in err and "Traceback" not in err
    saved = [p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and int(saved[0]) >= 2, saved

    # Resume, then two signals: the second ends the process at once, without saving.
    first = int(saved[0])
    proc = subprocess.Popen([sys.executable, "-m", "cli", "train", "--output", str(out), "--resume", "-q"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_a_row_after(proc, out, first)
    time.sleep(step / 2)
    aborted, err = _terminate(proc, times=2)
    assert proc.returncode == 143 and "aborted without saving" in err, err[-3000:]
    assert aborted < 2.0, aborted
    # whatever was on disk is whole: the run resumes from its last complete checkpoint
    res = subprocess.run([sys.executable, "-m", "cli", "train", "--output", str(out), "--resume", "--max-steps",
                          str(first + 2), "-q"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "eval.json").read_text())["step"] == first + 2


def _rows(out):
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip().endswith("}")] if path.is_file() else []
