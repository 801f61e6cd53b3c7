"""Evaluation of an adapter on a fixed eval set: loss, perplexity, ROUGE-1/2/L of greedy generations."""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import numpy as np

from flax_lora.data.batch import bucket_for, buckets, eval_batches
from advisor.examples import Example
from flax_lora.errors import UserError
from flax_lora.evaluation.generate import Sampling, kv_cache_support, make_greedy, make_greedy_cached, stop_ids_of
from flax_lora.lora import LoraConfig
from flax_lora.training.parallel import to_host
from flax_lora.training.step import make_eval_step

EVAL_BATCH = 16  # eval rows per batch (fewer when the eval set is smaller)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (rouge-score, with stemming), in [0, 1]."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    n = max(len(scores), 1)
    return {k: sum(s[k].fmeasure for s in scores) / n for k in ("rouge1", "rouge2", "rougeL")}


class Evaluator:
    """Loss and ROUGE of an adapter on a fixed eval set; compiled functions are reused.

    Generation stops at the tokenizer's eos and any of ``stop_ids`` (a chat template's end-of-turn).
    """

    def __init__(self, model, lora_cfg: LoraConfig, tokenizer, examples: Sequence[Example], *,
                 max_length: int, batch_size: int | None = None, max_new_tokens: int | None = None,
                 stop_ids: Sequence[int] = ()):
        self.model, self.lora_cfg, self.tokenizer = model, lora_cfg, tokenizer
        self.extra_stop_ids = tuple(stop_ids)
        self.examples = list(examples)
        self.max_length = max_length
        self.batch_size = batch_size or min(EVAL_BATCH, max(1, len(self.examples)))
        self.batches = eval_batches(self.examples, self.batch_size, max_length, tokenizer.pad_id)
        self._loss = make_eval_step(model, lora_cfg)
        longest = max((len(e.ids) - e.prompt_len for e in self.examples), default=16)
        self.max_new_tokens = max_new_tokens or min(bucket_for(longest, buckets(256)), 256)
        self._gen: dict[tuple, Any] = {}  # (new tokens, cached) or (new tokens, cached, "sample")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The tokens generation stops at: the tokenizer's eos and the extra ``stop_ids``."""
        return stop_ids_of([*stop_ids_of(self.tokenizer.eos_id), *self.extra_stop_ids])

    @functools.cached_property
    def cache_unsupported(self) -> str | None:
        """Why :meth:`generate` cannot use a KV cache with this model; None when it does."""
        return kv_cache_support(self.model)

    def loss(self, lora, frozen) -> dict[str, float]:
        total, n = 0.0, 0.0
        for b in self.batches:
            s, c = self._loss(lora, frozen, b)
            total, n = total + s, n + c  # device adds; one sync below
        total, n = (float(x) for x in to_host((total, n)))  # to_host: replicated over processes too
        loss = total / max(n, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(n)}

    def generate(self, lora, frozen, prompts: Sequence[np.ndarray], sampling: Sampling | None = None) -> list[list[int]]:
        """Continuations (token ids, cut before the first stop token) of tokenized prompts: greedy,
        or drawn as ``sampling`` says (batch ``i`` with key ``fold_in(key(seed), i)``)."""
        new = self.max_new_tokens
        sample = sampling is not None and not sampling.greedy
        stops = self.stop_ids
        out: list[list[int]] = []
        pad = self.tokenizer.pad_id
        for s in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[s:s + self.batch_size])
            chunk += [chunk[-1]] * (self.batch_size - len(chunk))
            width = bucket_for(max(len(p) for p in chunk), buckets(self.max_length)) + new
            cap = self.model.max_positions
            if cap and width > cap:  # the buffer (prompt + new tokens) must fit the position table
                if max(len(p) for p in chunk) >= cap:
                    raise UserError(f"prompt of {max(len(p) for p in chunk)} tokens leaves no room in the model's {cap} positions")
                width = cap
            buf = np.full((len(chunk), width), pad, np.int32)
            for i, p in enumerate(chunk):
                buf[i, :len(p)] = p
            lens = np.asarray([len(p) for p in chunk], np.int32)
            # the cached decoder needs room for all `new` tokens after the longest prompt, which only
            # a buffer cut to the position table can lack; such a chunk decodes without the cache
            cached = self.cache_unsupported is None and int(lens.max()) <= width - new
            gen = self._decoder(new, cached, sample)
            how = sampling.args(s // self.batch_size) if sample else ()
            res, res_len = to_host(gen(frozen, lora, buf, lens, *how))
            for i in range(min(self.batch_size, len(prompts) - s)):
                toks = res[i, lens[i]:res_len[i]].tolist()
                end = next((j for j, t in enumerate(toks) if t in stops), len(toks))
                out.append(toks[:end])
        return out

    def _decoder(self, new: int, cached: bool, sample: bool = False):
        """The compiled decoder for ``new`` tokens (keyed ``(new, cached)``, plus "sample" when sampling)."""
        key = (new, cached, "sample") if sample else (new, cached)
        if key not in self._gen:
            make = make_greedy_cached if cached else make_greedy
            self._gen[key] = make(self.model, self.lora_cfg, new, self.stop_ids, sample=sample)
        return self._gen[key]

    def rouge(self, lora, frozen, n: int = 32) -> dict[str, Any]:
        """ROUGE of greedy generations on the first ``n`` eval examples (plus a few samples)."""
        chosen = self.examples[:n]
        prompts = [e.ids[:max(e.prompt_len, 1)] for e in chosen]
        preds = [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in self.generate(lora, frozen, prompts)]
        refs = [e.target.strip() for e in chosen]
        result: dict[str, Any] = rouge(preds, refs)
        result["n"] = len(chosen)
        result["samples"] = [{"prompt": e.prompt, "reference": r, "generated": p} for e, r, p in zip(chosen[:3], refs, preds)]
        return result

    def evaluate(self, lora, frozen, rouge_n: int = 32) -> dict[str, Any]:
        out = self.loss(lora, frozen)
        if rouge_n:
            out.update(self.rouge(lora, frozen, rouge_n))
        return out
