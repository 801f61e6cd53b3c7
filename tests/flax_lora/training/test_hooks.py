"""The loop's pieces on their own: schedules, pending metrics, throughput, logging, checkpoints,
the divergence guard (no model: small fakes stand in for the run)."""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest

from flax_lora.errors import Diverged
from flax_lora.training.config import MAX_LR_HALVINGS
from flax_lora.training.hooks import (Clock, DivergenceGuard, Log, Pending, Saver, Throughput, due,
                                      first_nonfinite, fmt_lr)
from flax_lora.training.rundir import RunDir


def test_due_and_learning_rate_format():
    assert [s for s in range(1, 11) if due(s, 4)] == [4, 8]
    assert not any(due(s, 0) or due(s, None) for s in range(1, 5))
    assert (fmt_lr(2e-4), fmt_lr(1e-4), fmt_lr(2.5e-5), fmt_lr(0.05)) == ("2e-4", "1e-4", "2.5e-5", "0.05")


def _metrics(loss, gn=1.0, tokens=10.0, lr=1e-3):
    import jax.numpy as jnp

    return {"loss": jnp.float32(loss), "grad_norm": jnp.float32(gn), "tokens": jnp.float32(tokens),
            "learning_rate": jnp.float32(lr)}


def test_pending_fetches_all_in_order_and_empties():
    p = Pending()
    for step in (1, 2, 3):
        p.add(step, step / 10, _metrics(step))
    p.wait_previous()
    got = p.fetch()
    assert [(s, e, m["loss"]) for s, e, m in got] == [(1, 0.1, 1.0), (2, 0.2, 2.0), (3, 0.3, 3.0)]
    assert all(isinstance(v, float) for _, _, m in got for v in m.values()) and p.fetch() == []


def test_first_nonfinite_finds_the_earliest_bad_step():
    rows = [(1, 0.0, {"loss": 1.0, "grad_norm": 1.0}), (2, 0.0, {"loss": 2.0, "grad_norm": math.inf}),
            (3, 0.0, {"loss": math.nan, "grad_norm": 1.0})]
    assert first_nonfinite(rows) == (2, 2.0, math.inf) and first_nonfinite(rows[:1]) is None


def test_throughput_counts_host_tokens_and_leaves_paused_time_out():
    meter = Throughput(lambda seq: 100.0 * seq, "cpu", 1)
    batch = {"attention_mask": np.ones((2, 4, 8)), "input_ids": np.zeros((2, 4, 8))}
    meter.count(batch)
    assert (meter.tokens, meter.flops) == (64.0, 64 * 800.0)
    meter.t0 = time.time() - 1.0  # one second of training
    with meter.paused():
        time.sleep(0.2)  # an evaluation: not training time
    window = meter.window()
    assert window["tokens_per_second"] == pytest.approx(64.0, rel=0.1) and "mfu" not in window  # cpu: no peak
    assert meter.tokens == 0 and meter.total_tokens == 64.0
    summary = meter.summary()
    assert summary["train_tokens_per_second"] == pytest.approx(64.0, rel=0.1) and summary["devices"] == 1


class _Writer:
    def __init__(self):
        self.rows, self.closed = [], False

    def write(self, row):
        self.rows.append(row)

    def close(self):
        self.closed = True


def test_log_writes_token_weighted_rows_to_the_run_and_the_writers(tmp_path):
    rd, w = RunDir(tmp_path), _Writer()
    log = Log(rd, [w], total=10, start=0, show=False)
    fetched = [(1, 0.1, {"loss": 2.0, "tokens": 30.0, "learning_rate": 1e-3, "grad_norm": 5.0}),
               (2, 0.2, {"loss": 4.0, "tokens": 10.0, "learning_rate": 2e-3, "grad_norm": 7.0})]
    log.train(2, 0.2, fetched, {"tokens_per_second": 123.0})
    log.eval(2, 0.2, {"loss": 1.5, "perplexity": math.exp(1.5)})
    log.row({"step": 2, "event": "diverged"})
    rows = rd.read_metrics()
    assert rows[0] == {"step": 2, "epoch": 0.2, "loss": 2.5, "learning_rate": 2e-3, "grad_norm": 7.0,
                       "tokens_per_second": 123.0}
    assert rows[1]["eval_loss"] == 1.5 and rows[2]["event"] == "diverged"
    assert w.rows == rows[:2]  # events stay in metrics.jsonl
    log.close()
    assert w.closed


class _Checkpoints:
    def __init__(self):
        self.saved, self.dropped = {}, []

    def latest_step(self):
        return max(self.saved, default=None)

    def save(self, state, pos, eval_loss=None):
        self.saved[int(state.step)] = eval_loss

    def drop_after(self, step):
        self.dropped.append(step)
        for s in [s for s in self.saved if s > step]:
            del self.saved[s]

    def restore(self, like):
        step = self.latest_step()
        return SimpleNamespace(step=np.int32(step)), ("pos", step), {"eval_loss": self.saved[step]}


def test_saver_saves_each_step_once_with_the_latest_eval_loss():
    ckpt = _Checkpoints()
    saver = Saver(ckpt)
    saver.eval_loss = 0.7
    saver.save(SimpleNamespace(step=np.int32(5)), None)
    saver.eval_loss = 0.1
    saver.save(SimpleNamespace(step=np.int32(5)), None)  # same step: not again
    assert ckpt.saved == {5: 0.7}
    state, pos = saver.restore(None)
    assert int(state.step) == 5 and pos == ("pos", 5) and saver.eval_loss == 0.7


class _Job:
    """What the guard touches: the config, the run folder, the log, the checkpoints, the restart."""

    def __init__(self, tmp_path, policy):
        self.cfg = SimpleNamespace(learning_rate=1e-3, on_divergence=policy, output=str(tmp_path))
        self.rd = RunDir(tmp_path)
        self.log = Log(self.rd, [], 10, 0, show=False)
        self.saver = Saver(_Checkpoints())
        for step in (3, 6):
            self.saver.ckpt.save(SimpleNamespace(step=np.int32(step)), None)
        self.said, self.rates = [], []

    def say(self, msg):
        self.said.append(msg)

    def set_learning_rate(self, lr):
        self.rates.append(lr)
        self.cfg.learning_rate = lr

    def start(self):
        return "state", "pos"


BAD = [(7, 0.5, {"loss": 1.0, "grad_norm": 1.0, "learning_rate": 1e-3, "tokens": 1.0}),
       (8, 0.5, {"loss": math.nan, "grad_norm": math.inf, "learning_rate": 1e-3, "tokens": 1.0})]


def test_guard_stops_with_the_remedy_and_drops_the_checkpoint_before_the_bad_step(tmp_path):
    job = _Job(tmp_path, "stop")
    assert DivergenceGuard().check(job, BAD[:1], 0.5) is None
    with pytest.raises(Diverged, match=r"diverged at step 8.*kept the last good checkpoint \(step 6\).*"
                                       r"--resume --learning-rate 5e-4 \(or add --on-divergence halve-lr"):
        DivergenceGuard().check(job, BAD, 0.5)
    assert job.saver.ckpt.dropped == [6]
    events = [r for r in job.rd.read_metrics() if r.get("event") == "diverged"]
    assert events[0]["diverged_at_step"] == 8 and events[0]["lr_after"] == 5e-4


def test_guard_halves_the_rate_and_rolls_back_at_most_three_times(tmp_path):
    job = _Job(tmp_path, "halve-lr")
    guard = DivergenceGuard()
    for _ in range(MAX_LR_HALVINGS):
        assert guard.check(job, BAD, 0.5) == ("state", "pos")
    assert job.rates == [5e-4, 2.5e-4, 1.25e-4] and "retry 3 of 3" in job.said[-1]
    with pytest.raises(Diverged, match="after 3 automatic halvings"):
        guard.check(job, BAD, 0.5)
    retries = [r["retry"] for r in job.rd.read_metrics() if r.get("event") == "diverged" and "retry" in r]
    assert retries == [1, 2, 3] and json.loads(json.dumps(job.rd.read_metrics()))


def test_clock_adds_load_eval_before_and_the_first_step_and_gives_evaluations_share():
    clock = Clock()
    clock.seconds.update(load=2.0, eval_before=1.0)  # as if the sections had run
    with clock.section("eval"):
        time.sleep(0.01)
    row = clock.first_step_row(1, 3.0)
    assert row["event"] == "first_step" and row["time_to_first_step_seconds"] == 6.0
    assert (row["load_seconds"], row["eval_before_seconds"], row["compile_and_first_step_seconds"]) == (2.0, 1.0, 3.0)
    summary = clock.summary(wall_seconds=20.0)
    assert summary["time_to_first_step_seconds"] == 6.0
    assert 1.0 < summary["eval_seconds"] < 1.5 and summary["eval_share"] == pytest.approx(summary["eval_seconds"] / 20, abs=1e-3)
