"""Batches of tokenized examples: length buckets, padding, a seeded resumable order.

Batches are padded to a few length buckets (powers of two up to ``max_length``) so the train
step compiles a bounded number of times, and the order is a pure function of ``(seed, epoch)``:
a checkpoint records ``(epoch, batch index)`` and resuming replays exactly the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from advisor.examples import Example


def buckets(max_length: int, smallest: int = 16) -> list[int]:
    """Padded lengths: powers of two from ``smallest``, capped by (and ending at) ``max_length``."""
    out, n = [], smallest
    while n < max_length:
        out.append(n)
        n *= 2
    return out + [max_length]


def bucket_for(length: int, bucket_list: Sequence[int]) -> int:
    return next((b for b in bucket_list if b >= length), bucket_list[-1])


def collate(examples: Sequence[Example | None], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded arrays [n, length]; ``None`` slots are all-padding rows with no loss."""
    n = len(examples)
    ids = np.full((n, length), pad_id, np.int32)
    att = np.zeros((n, length), np.int32)
    lm = np.zeros((n, length), np.int32)
    for i, ex in enumerate(examples):
        if ex is None:
            continue
        k = min(len(ex.ids), length)
        ids[i, :k], att[i, :k], lm[i, :k] = ex.ids[:k], 1, ex.loss_mask[:k]
    return {"input_ids": ids, "attention_mask": att, "loss_mask": lm}


@dataclass(frozen=True)
class Position:
    """Where the data stream is: ``batch`` batches of ``epoch`` already consumed."""

    epoch: int = 0
    batch: int = 0


class Batches:
    """Shuffled, bucketed training batches of shape [accum, batch_size, T].

    Epoch ``e`` uses the permutation ``default_rng([seed, e])``; the last partial batch of an
    epoch is filled with empty rows (zero loss), so every example is seen once per epoch.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, accum: int, seed: int, max_length: int, pad_id: int):
        self.examples, self.batch_size, self.accum = list(examples), batch_size, accum
        self.seed, self.pad_id, self.buckets = seed, pad_id, buckets(max_length)
        self.per_step = batch_size * accum
        self.steps_per_epoch = max(1, math.ceil(len(self.examples) / self.per_step))

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def batch(self, pos: Position) -> dict[str, np.ndarray]:
        idx = self.order(pos.epoch)[pos.batch * self.per_step:(pos.batch + 1) * self.per_step]
        chosen: list[Example | None] = [self.examples[i] for i in idx]
        chosen += [None] * (self.per_step - len(chosen))
        length = bucket_for(max(len(e.ids) for e in chosen if e is not None), self.buckets)
        arrays = collate(chosen, length, self.pad_id)
        return {k: v.reshape(self.accum, self.batch_size, length) for k, v in arrays.items()}

    def iterate(self, start: Position = Position()) -> Iterator[tuple[Position, dict[str, np.ndarray]]]:
        """Yields (position after this batch, batch) forever, epoch after epoch."""
        pos = start
        while True:
            if pos.batch >= self.steps_per_epoch:
                pos = Position(pos.epoch + 1, 0)
            batch = self.batch(pos)
            pos = Position(pos.epoch, pos.batch + 1)
            yield pos, batch


def eval_batches(examples: Sequence[Example], batch_size: int, max_length: int, pad_id: int) -> list[dict[str, np.ndarray]]:
    """Fixed-order eval batches [batch_size, T], sorted by length to waste little padding."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    bl = buckets(max_length)
    out = []
    for s in range(0, len(order), batch_size):
        chunk: list[Example | None] = [examples[i] for i in order[s:s + batch_size]]
        length = bucket_for(max(len(e.ids) for e in chunk), bl)
        chunk += [None] * (batch_size - len(chunk))
        out.append(collate(chunk, length, pad_id))
    return out


