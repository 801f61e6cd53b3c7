"""Batches: length buckets, every example once per epoch, a seeded order a resume replays."""

from __future__ import annotations

import numpy as np

from flax_lora.data.batch import Batches, buckets, eval_batches
from advisor.examples import Example


def _examples(*lengths):
    return [Example(np.arange(n, dtype=np.int32), np.ones(n, np.int32), 0, "", "") for n in lengths]


def test_batches_are_bucketed_deterministic_and_resumable():
    ex = _examples(3, 5, 9, 17, 20, 4, 6)
    b = Batches(ex, batch_size=2, accum=2, seed=3, max_length=32, pad_id=0)
    assert b.steps_per_epoch == 2 and buckets(32) == [16, 32]
    stream = [x for _, x in zip(range(5), b.iterate())]
    assert all(x["input_ids"].shape[:2] == (2, 2) and x["input_ids"].shape[2] in (16, 32) for _, x in stream)
    # every example once per epoch: the padding rows carry no loss
    assert sum(int(x["loss_mask"].sum()) for _, x in stream[:2]) == sum(len(e.ids) for e in ex)
    pos2, _ = stream[2]
    resumed = next(b.iterate(stream[1][0]))
    assert resumed[0] == pos2 and np.array_equal(resumed[1]["input_ids"], stream[2][1]["input_ids"])
    assert not np.array_equal(b.order(0), b.order(1))


def test_eval_batches_cover_every_example_once_sorted_by_length():
    ex = _examples(30, 3, 12, 7, 5)
    batches = eval_batches(ex, batch_size=2, max_length=32, pad_id=0)
    assert [b["input_ids"].shape for b in batches] == [(2, 16), (2, 16), (2, 32)]
    assert sum(int(b["attention_mask"].sum()) for b in batches) == sum(len(e.ids) for e in ex)
