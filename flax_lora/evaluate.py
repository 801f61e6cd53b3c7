"""Evaluation: validation loss / perplexity, jitted greedy generation, ROUGE-1/2/L.

Greedy generation has two implementations with one interface,
``gen(frozen, lora, buf[B, L], lengths[B]) -> (buf, lengths)`` on a right-padded token buffer,
and both produce the same tokens:

* :func:`make_greedy_cached` (used wherever :func:`kv_cache_support` finds the model supports
  it: the Llama port and transformers' Flax GPT-2, OPT, GPT-Neo, GPT-J, BLOOM, Gemma, Llama,
  Mistral) runs the model with a KV cache, HF's Flax cache protocol: the prompts are moved to
  the *left*-padded layout HF's Flax ``generate`` uses, the whole prompt block is run once
  (prefill), then one token per step in a ``lax.while_loop``; the attention mask covers the
  full cache and position ids are ``cumsum(mask) - 1``, so every row sees its own positions.
* :func:`make_greedy` (the fallback) runs the whole model over the whole buffer for every new
  token and writes the argmax after each row's current length.

Shapes never change during a call, so a buffer size compiles once.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora.data import Example, bucket_for, buckets, eval_batches
from flax_lora.lora import LoraConfig, lora_active
from flax_lora.parallel import to_host
from flax_lora.train import make_eval_step

# Families without position ids whose positions come from the attention mask alone (ALiBi from
# cumsum(mask), as HF's Flax generate relies on), so left padding leaves them unchanged.
_POSITIONS_FROM_MASK = ("bloom",)


def kv_cache_support(model) -> str | None:
    """Why ``model`` cannot decode with a KV cache, or None when it can.

    Checked on the model itself, by abstract evaluation (nothing computed): its module takes
    ``init_cache`` and creates a ``cache`` collection with it, and it either takes position ids
    or derives positions from the attention mask (BLOOM's ALiBi).
    """
    module = model.module
    try:
        params = inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        return "its module's call signature is unknown"
    if "init_cache" not in params:
        return f"{type(module).__name__} has no init_cache"
    if not model.takes_position_ids and model.model_type not in _POSITIONS_FROM_MASK:
        return f"{type(module).__name__} takes no position ids (left padding would shift its positions)"
    try:
        cache = _cache_shapes(model, 1, 4)
    except Exception as exc:  # noqa: BLE001 - any failure to trace means: use the uncached path
        return f"init_cache failed ({type(exc).__name__}: {exc})"
    if not jax.tree_util.tree_leaves(cache):
        return "init_cache creates no cache"
    return None


def _call_kwargs(model, position_ids) -> dict:
    return {"position_ids": position_ids} if model.takes_position_ids else {}


def _cache_shapes(model, batch: int, length: int):
    """Abstract ``cache`` collection (ShapeDtypeStruct leaves) for a ``[batch, length]`` cache."""
    ids = jnp.zeros((batch, length), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (batch, length))

    def init():
        return model.module.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids), init_cache=True,
                                 return_dict=False, **_call_kwargs(model, pos))

    return jax.eval_shape(init).get("cache", {})


def make_greedy(model, lora_cfg: LoraConfig, max_new_tokens: int, eos_id: int | None):
    """Jitted ``gen(frozen, lora, buf[B, L], lengths[B]) -> (buf, lengths)``: greedy decoding."""
    eos = -1 if eos_id is None else int(eos_id)

    def gen(frozen, lora, buf, lengths):
        L = buf.shape[1]
        pos = jnp.arange(L)[None, :]

        def body(_, carry):
            buf, lengths, done = carry
            with lora_active(lora_cfg.scaling):
                logits = model.logits({"params": frozen, "lora": lora}, buf, (pos < lengths[:, None]).astype(jnp.int32))
            last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
            nxt = jnp.argmax(last.astype(jnp.float32), axis=-1).astype(buf.dtype)
            write = (~done) & (lengths < L)
            buf = jnp.where(write[:, None] & (pos == lengths[:, None]), nxt[:, None], buf)
            lengths = lengths + write.astype(lengths.dtype)
            done = done | (nxt == eos) | (lengths >= L)
            return buf, lengths, done

        done = jnp.zeros(buf.shape[0], bool)
        buf, lengths, _ = jax.lax.fori_loop(0, max_new_tokens, body, (buf, lengths, done))
        return buf, lengths

    return jax.jit(gen)


PREFILL_CHUNK = 512  # prompt tokens per prefill call: caps explicit attention scores at [B, H, 512, L]


def make_greedy_cached(model, lora_cfg: LoraConfig, max_new_tokens: int, eos_id: int | None, *,
                       prefill_chunk: int = PREFILL_CHUNK):
    """Jitted ``gen(frozen, lora, buf[B, L], lengths[B]) -> (buf, lengths)``: greedy decoding
    with a KV cache of length ``L``; same contract and tokens as :func:`make_greedy`.

    Needs ``max(lengths) <= L - max_new_tokens`` (the prompt block is ``L - max_new_tokens``
    wide): every row then has room for all its new tokens, as in the uncached buffer. A prompt
    block that is a multiple of ``prefill_chunk`` wider than it is prefilled chunk by chunk (a
    cached call attends over the whole cache with explicit scores: [B, H, P, L] in fp32 for the
    whole block at once would be ~9 GB at 16 x 2048 with 32 heads).
    """
    eos = -1 if eos_id is None else int(eos_id)
    new = int(max_new_tokens)

    def run(frozen, lora, cache, ids, mask, pos):
        with lora_active(lora_cfg.scaling):
            out, mut = model.module.apply({"params": frozen, "lora": lora, "cache": cache}, ids, mask,
                                          deterministic=True, return_dict=False, mutable=["cache"],
                                          **_call_kwargs(model, pos))
        return out[0][:, -1].astype(jnp.float32), mut["cache"]

    def gen(frozen, lora, buf, lengths):
        b, L = buf.shape
        P = L - new  # prompt block; the cache holds the prompt block and the new tokens
        if new < 1:
            return buf, lengths
        if P < 1:
            raise ValueError(f"buffer of {L} has no room for a prompt and {new} new tokens")
        lengths = lengths.astype(jnp.int32)
        shift = (P - lengths)[:, None]  # left pads of each row
        col = jnp.arange(L, dtype=jnp.int32)[None]
        src = jnp.arange(P, dtype=jnp.int32)[None] - shift
        prompt = jnp.where(src >= 0, jnp.take_along_axis(buf, jnp.clip(src, 0, L - 1), axis=1), 0)
        mask = (col >= shift).astype(jnp.int32)  # full cache length; the future is causally masked
        cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), _cache_shapes(model, b, L))
        prompt, pos = prompt.astype(jnp.int32), jnp.maximum(src, 0)
        c = prefill_chunk if P > prefill_chunk and P % prefill_chunk == 0 else P
        logits, cache = run(frozen, lora, cache, prompt[:, :c], mask, pos[:, :c])
        if c < P:
            def chunk(i, carry):
                cache, _ = carry
                part = lambda x: jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1)
                return run(frozen, lora, cache, part(prompt), mask, part(pos))[::-1]

            cache, logits = jax.lax.fori_loop(1, P // c, chunk, (cache, logits))

        def emit(k, logits, out, count, done):
            nxt = jnp.argmax(logits, axis=-1).astype(out.dtype)
            write = (~done) & (lengths + count < L)
            out = out.at[:, k].set(jnp.where(write, nxt, out[:, k]))
            count = count + write.astype(count.dtype)
            done = done | (nxt == eos) | (lengths + count >= L)
            return nxt, out, count, done

        out = jnp.zeros((b, new), buf.dtype)
        count = jnp.zeros(b, jnp.int32)
        nxt, out, count, done = emit(0, logits, out, count, jnp.zeros(b, bool))

        def cond(carry):
            k, _, _, _, _, done = carry
            return (k < new) & ~jnp.all(done)

        def body(carry):
            k, cache, nxt, out, count, done = carry
            # the token emitted at step k-1 sits at cache column P+k-1, position lengths+k-1
            logits, cache = run(frozen, lora, cache, nxt[:, None].astype(jnp.int32), mask, (lengths + k - 1)[:, None])
            nxt, out, count, done = emit(k, logits, out, count, done)
            return k + 1, cache, nxt, out, count, done

        _, _, _, out, count, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, nxt, out, count, done))
        rel = col - lengths[:, None]  # back to the right-padded buffer: new token k at lengths + k
        written = (rel >= 0) & (rel < count[:, None])
        buf = jnp.where(written, jnp.take_along_axis(out, jnp.clip(rel, 0, new - 1), axis=1), buf)
        return buf, lengths + count

    return jax.jit(gen)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (rouge-score, with stemming), in [0, 1]."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    n = max(len(scores), 1)
    return {k: sum(s[k].fmeasure for s in scores) / n for k in ("rouge1", "rouge2", "rougeL")}


class Evaluator:
    """Loss and ROUGE of an adapter on a fixed eval set; compiled functions are reused."""

    def __init__(self, model, lora_cfg: LoraConfig, tokenizer, examples: Sequence[Example], *,
                 max_length: int, batch_size: int = 8, max_new_tokens: int | None = None):
        self.model, self.lora_cfg, self.tokenizer = model, lora_cfg, tokenizer
        self.examples = list(examples)
        self.max_length, self.batch_size = max_length, batch_size
        self.batches = eval_batches(self.examples, batch_size, max_length, tokenizer.pad_token_id)
        self._loss = make_eval_step(model, lora_cfg)
        longest = max((len(e.ids) - e.prompt_len for e in self.examples), default=16)
        self.max_new_tokens = max_new_tokens or min(bucket_for(longest, buckets(256)), 256)
        self._gen: dict[tuple[int, bool], Any] = {}

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

    def generate(self, lora, frozen, prompts: Sequence[np.ndarray]) -> list[list[int]]:
        """Greedy continuations (token ids, eos stripped) of tokenized prompts."""
        new = self.max_new_tokens
        out: list[list[int]] = []
        pad = self.tokenizer.pad_token_id
        for s in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[s:s + self.batch_size])
            chunk += [chunk[-1]] * (self.batch_size - len(chunk))
            width = bucket_for(max(len(p) for p in chunk), buckets(self.max_length)) + new
            cap = self.model.max_positions
            if cap and width > cap:  # the buffer (prompt + new tokens) must fit the position table
                if max(len(p) for p in chunk) >= cap:
                    from flax_lora.errors import UserError

                    raise UserError(f"prompt of {max(len(p) for p in chunk)} tokens leaves no room in the model's {cap} positions")
                width = cap
            buf = np.full((len(chunk), width), pad, np.int32)
            for i, p in enumerate(chunk):
                buf[i, :len(p)] = p
            lens = np.asarray([len(p) for p in chunk], np.int32)
            # the cached decoder needs room for all `new` tokens after the longest prompt, which only
            # a buffer cut to the position table can lack; such a chunk decodes without the cache
            cached = self.cache_unsupported is None and int(lens.max()) <= width - new
            gen = self._greedy(new, cached)
            res, res_len = to_host(gen(frozen, lora, buf, lens))
            for i in range(min(self.batch_size, len(prompts) - s)):
                toks = res[i, lens[i]:res_len[i]].tolist()
                eos = self.tokenizer.eos_token_id
                out.append(toks[: toks.index(eos)] if eos in toks else toks)
        return out

    def _greedy(self, new: int, cached: bool):
        key = (new, cached)
        if key not in self._gen:
            make = make_greedy_cached if cached else make_greedy
            self._gen[key] = make(self.model, self.lora_cfg, new, self.tokenizer.eos_token_id)
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
