"""Jitted greedy generation, with a KV cache where the model supports one.

Greedy generation has two implementations with one interface,
``gen(frozen, lora, buf[B, L], lengths[B]) -> (buf, lengths)`` on a right-padded token buffer,
and both produce the same tokens:

* :func:`make_greedy_cached` (used wherever :func:`kv_cache_support` finds the model supports
  it: the project's ports (decoder, GPT-2) and transformers' Flax OPT, GPT-Neo, GPT-J, BLOOM)
  runs the model with a KV cache, HF's Flax cache protocol: the prompts are moved to
  the *left*-padded layout HF's Flax ``generate`` uses, the whole prompt block is run once
  (prefill), then one token per step in a ``lax.while_loop``; the attention mask covers the
  full cache and position ids are ``cumsum(mask) - 1``, so every row sees its own positions.
* :func:`make_greedy` (the fallback) runs the whole model over the whole buffer for every new
  token and writes the argmax after each row's current length.

Shapes never change during a call, so a buffer size compiles once.

Both take ``sample=True`` for sampling (:class:`Sampling`): ``gen`` then takes a PRNG key, a
temperature and a top-p as traced arguments (one compile for every setting), and the token of step
``k`` is drawn with ``fold_in(key, k)`` by :func:`sample_next` inside the jitted loop, so the cached
and uncached paths draw with the same keys. Greedy (the default) is the argmax it always was.

The host side of ``lora generate`` is here too: :class:`Prompt` (a plain prompt with the BOS
``tokenizer(text)`` adds, or a user turn rendered with the chat template, whose BOS the template
writes, as in training) and where its answer ends (:func:`end_of_turn`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flax_lora.lora import LoraConfig, lora_active

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


class Sampling(NamedTuple):
    """How each new token is chosen: temperature 0 is greedy (argmax); above 0, a draw from the
    temperature-scaled distribution cut to its top-p nucleus, reproducible from ``seed``."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def args(self, stream: int = 0) -> tuple:
        """The sampling ``gen``'s extra arguments (key, temperature, top_p); ``stream`` numbers the
        calls of one generation (the batches of an eval set) so each draws with its own key."""
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), stream)
        return key, jnp.float32(self.temperature), jnp.float32(self.top_p)


def sample_next(logits, key, temperature, top_p):
    """Next token ids [B] of logits [B, V]: a categorical draw at ``temperature`` from the nucleus
    (the most likely tokens whose probability, before each, is under ``top_p``; the most likely is
    always in it, so a tiny top-p is greedy); ``temperature`` 0 is the argmax."""
    logits = logits.astype(jnp.float32)
    best = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    ranked = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens more likely than each
    keep = (before < top_p).at[:, 0].set(True)
    floor = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)  # least likely kept logit
    draw = jax.random.categorical(key, jnp.where(scaled >= floor, scaled, -jnp.inf), axis=-1)
    return jnp.where(temperature > 0, draw, best)


def stop_ids_of(eos) -> tuple[int, ...]:
    """Stop tokens as a tuple: ``eos`` may be None, one id, or several."""
    if eos is None:
        return ()
    if isinstance(eos, Iterable):
        return tuple(dict.fromkeys(int(e) for e in eos))
    return (int(eos),)


def _stopped(nxt, stops: tuple[int, ...]):
    """Which rows' new token is one of ``stops``."""
    hit = jnp.zeros(nxt.shape, bool)
    for s in stops:
        hit = hit | (nxt == s)
    return hit


def _picker(sample: bool):
    """``pick(logits [B, V], step, how) -> ids [B]``: the argmax, or with ``sample`` a draw with the
    step's key (``how`` = key, temperature, top_p, as :meth:`Sampling.args` gives them)."""
    if not sample:
        return lambda logits, step, how: jnp.argmax(logits.astype(jnp.float32), axis=-1)

    def pick(logits, step, how):
        key, temperature, top_p = how
        return sample_next(logits, jax.random.fold_in(key, step), temperature, top_p)

    return pick


def make_greedy(model, lora_cfg: LoraConfig, max_new_tokens: int, eos_id: int | Iterable[int] | None, *,
                sample: bool = False):
    """Jitted ``gen(frozen, lora, buf[B, L], lengths[B]) -> (buf, lengths)``: greedy decoding; a row
    stops at any of ``eos_id`` (one id or several). ``sample=True``: ``gen(frozen, lora, buf, lengths,
    key, temperature, top_p)`` draws each token (:func:`sample_next`)."""
    stops, pick = stop_ids_of(eos_id), _picker(sample)

    def gen(frozen, lora, buf, lengths, *how):
        L = buf.shape[1]
        pos = jnp.arange(L)[None, :]

        def body(i, carry):
            buf, lengths, done = carry
            with lora_active(lora_cfg.scaling):
                logits = model.logits({"params": frozen, "lora": lora}, buf, (pos < lengths[:, None]).astype(jnp.int32))
            last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
            nxt = pick(last, i, how).astype(buf.dtype)
            write = (~done) & (lengths < L)
            buf = jnp.where(write[:, None] & (pos == lengths[:, None]), nxt[:, None], buf)
            lengths = lengths + write.astype(lengths.dtype)
            done = done | _stopped(nxt, stops) | (lengths >= L)
            return buf, lengths, done

        done = jnp.zeros(buf.shape[0], bool)
        buf, lengths, _ = jax.lax.fori_loop(0, max_new_tokens, body, (buf, lengths, done))
        return buf, lengths

    return jax.jit(gen)


PREFILL_CHUNK = 512  # prompt tokens per prefill call: caps explicit attention scores at [B, H, 512, L]


def _left_aligned(buf, lengths, P: int):
    """(prompt block [B, P] left-padded as HF's Flax generate lays it out, attention mask over the
    whole cache [B, L], position ids [B, P]) of a right-padded buffer."""
    L = buf.shape[1]
    shift = (P - lengths)[:, None]  # left pads of each row
    col = jnp.arange(L, dtype=jnp.int32)[None]
    src = jnp.arange(P, dtype=jnp.int32)[None] - shift
    prompt = jnp.where(src >= 0, jnp.take_along_axis(buf, jnp.clip(src, 0, L - 1), axis=1), 0)
    mask = (col >= shift).astype(jnp.int32)  # full cache length; the future is causally masked
    return prompt.astype(jnp.int32), mask, jnp.maximum(src, 0)


def _prefill(run, frozen, lora, cache, prompt, mask, pos, chunk: int):
    """Run the prompt block into the cache (chunk by chunk when it is a multiple of ``chunk`` wider);
    (last position's logits, cache)."""
    P = prompt.shape[1]
    c = chunk if P > chunk and P % chunk == 0 else P
    logits, cache = run(frozen, lora, cache, prompt[:, :c], mask, pos[:, :c])
    if c < P:
        def step(i, carry):
            cache, _ = carry
            part = lambda x: jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1)
            return run(frozen, lora, cache, part(prompt), mask, part(pos))[::-1]

        cache, logits = jax.lax.fori_loop(1, P // c, step, (cache, logits))
    return logits, cache


def make_greedy_cached(model, lora_cfg: LoraConfig, max_new_tokens: int, eos_id: int | Iterable[int] | None, *,
                       prefill_chunk: int = PREFILL_CHUNK, sample: bool = False):
    """Jitted ``gen(frozen, lora, buf[B, L], lengths[B]) -> (buf, lengths)``: greedy decoding
    with a KV cache of length ``L``; the contract, tokens and sampling keys of :func:`make_greedy`.

    Needs ``max(lengths) <= L - max_new_tokens`` (the prompt block is ``L - max_new_tokens``
    wide): every row then has room for all its new tokens, as in the uncached buffer. A prompt
    block that is a multiple of ``prefill_chunk`` wider than it is prefilled chunk by chunk (a
    cached call attends over the whole cache with explicit scores: [B, H, P, L] in fp32 for the
    whole block at once would be ~9 GB at 16 x 2048 with 32 heads).
    """
    stops, pick = stop_ids_of(eos_id), _picker(sample)
    new = int(max_new_tokens)

    def run(frozen, lora, cache, ids, mask, pos):
        with lora_active(lora_cfg.scaling):
            out, mut = model.module.apply({"params": frozen, "lora": lora, "cache": cache}, ids, mask,
                                          deterministic=True, return_dict=False, mutable=["cache"],
                                          **_call_kwargs(model, pos))
        return out[0][:, -1].astype(jnp.float32), mut["cache"]

    def gen(frozen, lora, buf, lengths, *how):
        b, L = buf.shape
        P = L - new  # prompt block; the cache holds the prompt block and the new tokens
        if new < 1:
            return buf, lengths
        if P < 1:
            raise ValueError(f"buffer of {L} has no room for a prompt and {new} new tokens")
        lengths = lengths.astype(jnp.int32)
        col = jnp.arange(L, dtype=jnp.int32)[None]
        prompt, mask, pos = _left_aligned(buf, lengths, P)
        cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), _cache_shapes(model, b, L))
        logits, cache = _prefill(run, frozen, lora, cache, prompt, mask, pos, prefill_chunk)

        def emit(k, logits, out, count, done):
            nxt = pick(logits, k, how).astype(out.dtype)
            write = (~done) & (lengths + count < L)
            out = out.at[:, k].set(jnp.where(write, nxt, out[:, k]))
            count = count + write.astype(count.dtype)
            done = done | _stopped(nxt, stops) | (lengths + count >= L)
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


# --- prompts: what generation starts from and where its answer ends (host side) ---------------

_ANSWER = "lora-generate-answer"  # a stand-in assistant answer, to find what a template writes after one


def end_of_turn(template: str, special: dict) -> str:
    """The text ``template`` writes after an assistant answer (``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``, an eos), whitespace stripped: what a model trained on it ends answers with;
    "" when the template writes nothing there."""
    from advisor.templates import render

    text = render(template, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _ANSWER}], special)
    at = text.rfind(_ANSWER)
    return text[at + len(_ANSWER):].strip() if at >= 0 else ""


def end_of_turn_ids(tokenizer, template: str) -> tuple[tuple[int, ...], str | None]:
    """(stop ids, cut) of a chat template: its end-of-turn as one stop token beside the tokenizer's
    eos, or, when the end-of-turn is several tokens, the eos alone and the marker to cut at."""
    marker = end_of_turn(template, tokenizer.special)
    marker_ids = tokenizer.encode(marker)[0] if marker else []
    if len(marker_ids) == 1:
        return stop_ids_of([*stop_ids_of(tokenizer.eos_id), *marker_ids]), None
    return stop_ids_of(tokenizer.eos_id), marker or None


@dataclass(frozen=True)
class Prompt:
    """A prompt's token ids and where its answer ends: ``stop_ids`` stop decoding (the tokenizer's
    eos, and a chat template's end-of-turn when that is one token); ``cut`` is an end-of-turn of
    several tokens, cut from the decoded answer instead."""

    ids: tuple[int, ...]
    stop_ids: tuple[int, ...]
    cut: str | None = None

    @classmethod
    def plain(cls, tokenizer, text: str) -> "Prompt":
        """``text`` as ``tokenizer(text)`` encodes it (the model's BOS first, as training's non-chat rows)."""
        return cls(tuple(tokenizer.encode_prompt(text)), stop_ids_of(tokenizer.eos_id))

    @classmethod
    def chat(cls, tokenizer, template: str, text: str, system: str | None = None) -> "Prompt":
        """``text`` as a user turn (after a ``system`` turn when given) rendered with ``template`` and
        its generation prompt, encoded without added special tokens: the template writes the BOS,
        so there is one, as in the chats training encodes (:func:`advisor.examples.encode`)."""
        from advisor.templates import render

        messages = ([] if system is None else [{"role": "system", "content": system}]) + [{"role": "user", "content": text}]
        ids = tokenizer.encode(render(template, messages, tokenizer.special, add_generation_prompt=True))[0]
        stops, cut = end_of_turn_ids(tokenizer, template)
        return cls(tuple(ids), stops, cut)

    def answer(self, tokenizer, tokens) -> str:
        """The generated tokens (stop token removed) as text, cut at a multi-token end-of-turn."""
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if self.cut and self.cut in text:
            text = text[:text.index(self.cut)]
        return text.strip()
