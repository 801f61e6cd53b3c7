"""Batches of tokenized examples: length buckets, padding, a seeded resumable order.

Batches are padded to a few length buckets (powers of two up to ``max_length``) so the train
step compiles a bounded number of times, and the order is a pure function of ``(seed, epoch)``:
a checkpoint records ``(epoch, batch index)`` and resuming replays exactly the same batches.

Packing (``lora train --packing``): each batch row holds several examples back to back
(:func:`first_fit`), and the batch carries ``segment_ids`` (1, 2, ... per example in the row, 0 on
padding) and ``position_ids`` (restarting at 0 for each example), which the model uses to confine
attention to each example (:mod:`flax_lora.models.decoder`). See :class:`Batches`.
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


PACK_STREAM = 0x7061636B  # "pack": the seed stream of the packing order, apart from the epochs' (0, 1, ...)


def first_fit(lengths: Sequence[int], capacity: int, order: Sequence[int]) -> list[list[int]]:
    """Rows of example indices: each example, taken in ``order``, goes into the first row (the
    lowest-numbered) with room for it, a new row when none has; a row's lengths sum to at most
    ``capacity`` (a longer example gets a row of its own and is cut when collated).

    O(n log n): a max tree over the rows' free room finds the first row that fits, so packing a
    large data set at start-up stays fast (a scan over the open rows would be O(n * rows)).
    """
    size = 1 << max(0, (len(order) - 1).bit_length())
    free = [capacity] * (2 * size)  # free[1] is the root; leaves size.. are the rows, all empty at first
    rows: list[list[int]] = []
    for i in order:
        need = min(int(lengths[i]), capacity)
        node = 1
        while node < size:  # descend to the leftmost leaf with room (the root always has: an empty row)
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(int(i))
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def collate_packed(rows: Sequence[Sequence[Example] | None], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded arrays [n, length] of rows holding several examples each, plus ``segment_ids``
    (1, 2, ... per example, 0 on padding) and ``position_ids`` (0, 1, ... within each example).

    Each example's first token gets loss mask 0: it would be predicted from the previous example's
    last token, and unpacked it is a row's first token, which is never a target; so the summed
    loss and the target count equal the unpacked batch's.
    """
    n = len(rows)
    out = {k: np.zeros((n, length), np.int32) for k in ("attention_mask", "loss_mask", "segment_ids", "position_ids")}
    ids = np.full((n, length), pad_id, np.int32)
    for i, row in enumerate(rows):
        at = 0
        for seg, ex in enumerate(row or (), start=1):
            k = min(len(ex.ids), length - at)
            if k <= 0:
                break
            span = slice(at, at + k)
            ids[i, span], out["loss_mask"][i, span] = ex.ids[:k], ex.loss_mask[:k]
            out["loss_mask"][i, at] = 0
            out["attention_mask"][i, span], out["segment_ids"][i, span] = 1, seg
            out["position_ids"][i, span] = np.arange(k, dtype=np.int32)
            at += k
    return {"input_ids": ids, **out}


@dataclass(frozen=True)
class Position:
    """Where the data stream is: ``batch`` batches of ``epoch`` already consumed."""

    epoch: int = 0
    batch: int = 0


class Batches:
    """Shuffled, bucketed training batches of shape [accum, batch_size, T].

    Epoch ``e`` uses the permutation ``default_rng([seed, e])``; the last partial batch of an
    epoch is filled with empty rows (zero loss), so every example is seen once per epoch.

    ``packing``: the examples are packed once, by :func:`first_fit` into rows of at most
    ``max_length`` tokens in the seeded order ``default_rng([seed, PACK_STREAM])``, and the
    epochs shuffle those rows as above. Packing once (not per epoch) keeps the number of rows, so
    ``steps_per_epoch`` (the run's total steps and learning-rate schedule rest on it) is one number
    and the order stays a pure function of ``(seed, epoch)``; the examples sharing a row are the
    same every epoch, which changes nothing in the loss (attention is confined to each example).
    Batches then also carry ``segment_ids`` and ``position_ids`` (:func:`collate_packed`).
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, accum: int, seed: int, max_length: int,
                 pad_id: int, packing: bool = False):
        self.examples, self.batch_size, self.accum = list(examples), batch_size, accum
        self.seed, self.pad_id, self.buckets = seed, pad_id, buckets(max_length)
        self.per_step = batch_size * accum
        self.packing = packing
        self.rows: list[list[int]] | None = None
        if packing:
            pack_order = np.random.default_rng([seed, PACK_STREAM]).permutation(len(self.examples))
            self.rows = first_fit([len(e.ids) for e in self.examples], max_length, pack_order)
        n = len(self.rows) if self.rows is not None else len(self.examples)
        self.steps_per_epoch = max(1, math.ceil(n / self.per_step))

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's order of the examples (of the packed rows, with packing)."""
        n = len(self.rows) if self.rows is not None else len(self.examples)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def batch(self, pos: Position) -> dict[str, np.ndarray]:
        idx = self.order(pos.epoch)[pos.batch * self.per_step:(pos.batch + 1) * self.per_step]
        if self.rows is not None:
            return self._packed_batch(idx)
        chosen: list[Example | None] = [self.examples[i] for i in idx]
        chosen += [None] * (self.per_step - len(chosen))
        length = bucket_for(max(len(e.ids) for e in chosen if e is not None), self.buckets)
        arrays = collate(chosen, length, self.pad_id)
        return {k: v.reshape(self.accum, self.batch_size, length) for k, v in arrays.items()}

    def _packed_batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The packed rows ``idx`` (and empty rows to fill the step), padded to their longest row's bucket."""
        chosen: list[list[Example] | None] = [[self.examples[i] for i in self.rows[r]] for r in idx]
        chosen += [None] * (self.per_step - len(chosen))
        longest = max(sum(len(e.ids) for e in row) for row in chosen if row is not None)
        length = bucket_for(longest, self.buckets)
        arrays = collate_packed(chosen, length, self.pad_id)
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


