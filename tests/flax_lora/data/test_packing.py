"""Packed batches: first-fit rows, segment and position ids, every example once per epoch, the
same target tokens as unpacked, a seeded order a resume replays."""

from __future__ import annotations

import math

import numpy as np

from advisor.examples import Example
from flax_lora.data.batch import Batches, Position, buckets, collate_packed, first_fit


def _examples(lengths, seed=0):
    """Examples with distinct ids (their index in the high bits) and a loss mask on the last half,
    the first token included (as a text document without BOS has it)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = (i * 1000 + np.arange(n)).astype(np.int32)
        mask = (np.arange(n) >= n // 2).astype(np.int32)
        mask[0] = int(rng.integers(0, 2))
        out.append(Example(ids, mask, 0, "", ""))
    return out


def _naive_first_fit(lengths, capacity, order):
    rows, room = [], []
    for i in order:
        need = min(lengths[i], capacity)
        r = next((j for j, free in enumerate(room) if free >= need), None)
        if r is None:
            rows.append([]), room.append(capacity)
            r = len(rows) - 1
        rows[r].append(int(i))
        room[r] -= need
    return rows


def test_first_fit_matches_the_naive_first_fit():
    rng = np.random.default_rng(1)
    for n, cap in [(1, 8), (2, 8), (7, 16), (300, 64), (1000, 512)]:
        lengths = list(rng.integers(1, cap + 1, n))
        order = rng.permutation(n)
        rows = first_fit(lengths, cap, order)
        assert rows == _naive_first_fit(lengths, cap, order)
        assert sorted(i for row in rows for i in row) == list(range(n))
        assert all(sum(lengths[i] for i in row) <= cap for row in rows)


def test_collate_packed_segments_positions_and_first_token_masks():
    ex = _examples([3, 5, 4])
    b = collate_packed([ex[:2], None, ex[2:]], 16, pad_id=7)
    assert b["segment_ids"][0].tolist() == [1] * 3 + [2] * 5 + [0] * 8
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4] + [0] * 8
    assert b["input_ids"][0, :8].tolist() == ex[0].ids.tolist() + ex[1].ids.tolist()
    assert (b["input_ids"][1] == 7).all() and not b["attention_mask"][1].any() and not b["segment_ids"][1].any()
    assert b["attention_mask"][0].tolist() == [1] * 8 + [0] * 8
    # each example's first token is never a target (it would be predicted from the previous example)
    assert b["loss_mask"][0, 0] == 0 and b["loss_mask"][0, 3] == 0
    assert b["loss_mask"][0, 1:3].tolist() == ex[0].loss_mask[1:].tolist()
    assert b["loss_mask"][0, 4:8].tolist() == ex[1].loss_mask[1:].tolist()


def _epoch(b, epoch=0):
    return [b.batch(Position(epoch, i)) for i in range(b.steps_per_epoch)]


def test_packed_epoch_sees_every_example_once_with_the_unpacked_target_count():
    lengths = list(np.random.default_rng(2).integers(2, 40, 50))
    ex = _examples(lengths)
    packed = Batches(ex, batch_size=2, accum=2, seed=3, max_length=64, pad_id=0, packing=True)
    plain = Batches(ex, batch_size=2, accum=2, seed=3, max_length=64, pad_id=0)
    assert packed.steps_per_epoch == math.ceil(len(packed.rows) / 4) < plain.steps_per_epoch
    for epoch in (0, 1):
        seen = []
        for x in _epoch(packed, epoch):
            assert x["input_ids"].shape[:2] == (2, 2) and x["input_ids"].shape[2] in buckets(64)
            assert set(x) == {"input_ids", "attention_mask", "loss_mask", "segment_ids", "position_ids"}
            t = x["input_ids"].shape[2]
            ids, seg = x["input_ids"].reshape(-1, t), x["segment_ids"].reshape(-1, t)
            for row_ids, row_seg in zip(ids, seg):
                for s in range(1, int(row_seg.max()) + 1):  # segment s: one whole example
                    (i,) = set(row_ids[row_seg == s] // 1000)
                    assert np.array_equal(row_ids[row_seg == s], ex[i].ids)
                    seen.append(int(i))
        assert sorted(seen) == list(range(len(ex)))
        targets = lambda xs: sum(int(x["loss_mask"][..., 1:].sum()) for x in xs)
        assert targets(_epoch(packed, epoch)) == targets(_epoch(plain, epoch))


def test_packed_order_is_seeded_and_a_resume_replays_it():
    ex = _examples(list(np.random.default_rng(4).integers(2, 30, 40)))
    b = Batches(ex, batch_size=2, accum=1, seed=5, max_length=32, pad_id=0, packing=True)
    again = Batches(ex, batch_size=2, accum=1, seed=5, max_length=32, pad_id=0, packing=True)
    stream = [x for _, x in zip(range(b.steps_per_epoch + 3), b.iterate())]
    assert b.rows == again.rows
    pos, _ = stream[b.steps_per_epoch]  # into the second epoch
    for (p1, x1), (p2, x2) in zip(stream[b.steps_per_epoch + 1:], again.iterate(pos)):
        assert p1 == p2 and all(np.array_equal(x1[k], x2[k]) for k in x1)
    assert not np.array_equal(b.order(0), b.order(1))
    other = Batches(ex, batch_size=2, accum=1, seed=6, max_length=32, pad_id=0, packing=True)
    assert other.rows != b.rows


def test_unpacked_batches_carry_no_packing_keys():
    b = Batches(_examples([3, 5, 9]), batch_size=2, accum=1, seed=0, max_length=16, pad_id=0)
    assert set(b.batch(Position())) == {"input_ids", "attention_mask", "loss_mask"}


def test_the_advisors_fill_factor_is_what_first_fit_reaches_on_short_data():
    """advisor.rules.PACKING_FILL (its packed-row estimate) against the trainer's packing: first fit
    fills at least that much of each row on log-normal lengths, so the estimate errs to more steps."""
    from advisor.rules import PACKING_FILL

    rng = np.random.default_rng(0)
    for median, cap in [(100, 512), (50, 512), (200, 1024)]:
        lengths = np.clip(rng.lognormal(np.log(median), 0.8, 2000).astype(int), 2, cap)
        rows = first_fit(lengths, cap, rng.permutation(len(lengths)))
        fill = lengths.sum() / (len(rows) * cap)
        assert PACKING_FILL <= fill < 1.0
        assert math.ceil(lengths.sum() / (cap * PACKING_FILL)) >= len(rows)
