"""Fused, chunked cross-entropy over the vocabulary for a frozen output projection.

``fused_token_nll(hidden, weight, input_ids, loss_mask)`` equals
``token_nll(hidden @ W, input_ids, loss_mask)`` (summed NLL of target tokens, target count) but
never materialises the [B, T, V] float32 logits:

- only target positions are computed: they are gathered to the front (a stable sort on the
  mask) and a ``while`` loop runs over ``ceil(n_targets / chunk)`` chunks of ``chunk`` tokens,
  so prompt and padding tokens cost nothing;
- per chunk: logits = h W in the compute dtype with float32 accumulation, log-sum-exp and the
  target logit in float32, and, under differentiation, the gradient with respect to the hidden
  states ``(softmax - onehot) W^T`` right away (a ``custom_vjp`` whose forward does it), so the
  backward pass is one multiply by the incoming cotangent and the logits are never stored nor
  recomputed: two matmuls over the vocabulary per token, like the unfused loss.

``weight`` is frozen: no gradient flows to it (LoRA never adapts the output projection through
this path; :func:`model_token_nll` falls back to the plain loss when it would).
"""

from __future__ import annotations

import math
import os
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from flax_lora.models.base import packed_inputs
from flax_lora.models.decoder import DecoderLM
from flax_lora.models.gpt2 import GPT2LM

# where each port keeps the embedding its tied output head reuses
_TIED_EMBEDDING = {DecoderLM: ("model", "embed_tokens", "embedding"), GPT2LM: ("transformer", "wte", "embedding")}

# LORA_FUSED_LOSS=0 turns the fused path off (A/B benchmarks); read at trace time.
def fused_enabled() -> bool:
    return os.environ.get("LORA_FUSED_LOSS", "1") != "0"


# Bytes of one [chunk, V] float32 block (the advisor's memory model assumes the same).
TARGET_CHUNK_BYTES = 128 * 2**20


def default_chunk(vocab: int, n_tokens: int) -> int:
    """Tokens per chunk: a power of two with chunk * vocab * 4 bytes <= 128 MiB, in [16, 4096]."""
    target = TARGET_CHUNK_BYTES
    c = max(16, min(4096, target // (4 * vocab)))
    c = 2 ** int(math.log2(c))
    return max(16, min(c, 2 ** math.ceil(math.log2(max(n_tokens, 1)))))


def _logits(h, w, vocab_major: bool):
    """[C, V] float32 logits; ``w`` is [V, H] (an embedding) when ``vocab_major`` else [H, V]."""
    dims = (((1,), (1,)), ((), ())) if vocab_major else (((1,), (0,)), ((), ()))
    return lax.dot_general(h, w.astype(h.dtype), dims, preferred_element_type=jnp.float32)


def _dh(g, w, vocab_major: bool, dtype):
    """[C, H] = g [C, V] times W^T, in the compute dtype with float32 accumulation."""
    dims = (((1,), (0,)), ((), ())) if vocab_major else (((1,), (1,)), ((), ()))
    return lax.dot_general(g.astype(dtype), w.astype(dtype), dims, preferred_element_type=jnp.float32)


def _sorted_targets(hidden, input_ids, loss_mask, chunk):
    """Flattened (h, labels, weights) of positions 0..T-2 with targets first, padded to ``chunk``."""
    b, t, d = hidden.shape
    h = hidden[:, :-1].reshape(-1, d)
    labels = input_ids[:, 1:].reshape(-1).astype(jnp.int32)
    w = loss_mask[:, 1:].reshape(-1).astype(jnp.float32)
    n = h.shape[0]
    pad = (-n) % chunk
    order = jnp.argsort(w <= 0, stable=True)  # targets (w > 0) first, original order kept
    h = jnp.pad(h[order], ((0, pad), (0, 0)))
    labels = jnp.pad(labels[order], (0, pad))
    w = jnp.pad(w[order], (0, pad))
    n_chunks = (jnp.sum(w > 0) + chunk - 1) // chunk
    return h, labels, w, order, n_chunks


def _max_sumexp_two_pass(logits):
    m = jnp.max(logits, axis=-1, keepdims=True)
    return m, jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True)


def _max_sumexp_one_pass(logits):
    """One variadic reduce with the online-softmax rescaling."""

    def combine(a, b):
        (m1, s1), (m2, s2) = a, b
        m = jnp.maximum(m1, m2)
        # a side that has seen nothing yet (-inf, 0) adds 0, not exp(-inf + inf) = nan
        s1 = jnp.where(m1 == -jnp.inf, 0.0, s1 * jnp.exp(m1 - m))
        s2 = jnp.where(m2 == -jnp.inf, 0.0, s2 * jnp.exp(m2 - m))
        return m, s1 + s2

    init = (jnp.array(-jnp.inf, jnp.float32), jnp.array(0.0, jnp.float32))
    m, s = lax.reduce((logits, jnp.ones_like(logits)), init, combine, (logits.ndim - 1,))
    return m[..., None], s[..., None]


def _max_sumexp(logits):
    """(max, sum(exp(logits - max))) over the last axis, [C, 1] each.

    On GPUs in one pass over ``logits`` (the chunk's largest array; a max pass then a sum pass
    read it twice), which saves memory traffic (figures: ``benchmarks/RESULTS.md``). XLA:CPU
    runs the variadic reduce slower than the two passes (two ``exp`` per element, not
    vectorised), so the CPU keeps them.
    """
    return lax.platform_dependent(logits, cpu=_max_sumexp_two_pass, default=_max_sumexp_one_pass)


def _loop(h, labels, w, weight, vocab_major, chunk, n_chunks, with_grad: bool, softcap: float | None = None):
    """Summed weighted NLL over the first ``n_chunks`` chunks (and d/dh per row if asked).

    ``softcap`` (Gemma 2's final logits): the loss is on ``cap * tanh(logits / cap)``, and the
    gradient through it is multiplied by ``1 - tanh^2``."""
    dtype = h.dtype

    def body(i, carry):
        total, grad = carry
        hc = lax.dynamic_slice_in_dim(h, i * chunk, chunk)
        lc = lax.dynamic_slice_in_dim(labels, i * chunk, chunk)
        wc = lax.dynamic_slice_in_dim(w, i * chunk, chunk)
        raw = _logits(hc, weight, vocab_major)
        tanh = None if softcap is None else jnp.tanh(raw / softcap)
        logits = raw if softcap is None else tanh * softcap
        m, s = _max_sumexp(logits)
        e = jnp.exp(logits - m)
        lse = (m + jnp.log(s))[:, 0]
        target = jnp.take_along_axis(logits, lc[:, None], axis=-1)[:, 0]
        total = total + jnp.sum((lse - target) * wc)
        if with_grad:
            # w * (softmax - onehot) in one pass that writes the compute dtype (a scatter of -w
            # into a float32 copy, then a cast, would be two more passes over [chunk, V];
            # figures: benchmarks/RESULTS.md)
            onehot = lax.broadcasted_iota(jnp.int32, logits.shape, 1) == lc[:, None]
            g = e * (wc[:, None] / s) - jnp.where(onehot, wc[:, None], 0.0)
            g = (g if tanh is None else g * (1.0 - tanh * tanh)).astype(dtype)
            grad = lax.dynamic_update_slice_in_dim(grad, _dh(g, weight, vocab_major, dtype).astype(grad.dtype),
                                                   i * chunk, 0)
        return total, grad

    grad0 = jnp.zeros(h.shape, jnp.float32) if with_grad else jnp.zeros((), jnp.float32)
    return lax.fori_loop(0, n_chunks, body, (jnp.zeros((), jnp.float32), grad0))


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(hidden, weight, input_ids, loss_mask, vocab_major, chunk, softcap):
    h, labels, w, _, n_chunks = _sorted_targets(hidden, input_ids, loss_mask, chunk)
    total, _ = _loop(h, labels, w, weight, vocab_major, chunk, n_chunks, False, softcap)
    return total


def _fused_fwd(hidden, weight, input_ids, loss_mask, vocab_major, chunk, softcap):
    b, t, d = hidden.shape
    h, labels, w, order, n_chunks = _sorted_targets(hidden, input_ids, loss_mask, chunk)
    total, grad_sorted = _loop(h, labels, w, weight, vocab_major, chunk, n_chunks, True, softcap)
    n = b * (t - 1)
    grad = jnp.zeros((n, d), jnp.float32).at[order].set(grad_sorted[:n])
    grad = jnp.pad(grad.reshape(b, t - 1, d), ((0, 0), (0, 1), (0, 0)))
    return total, (grad.astype(hidden.dtype), weight, input_ids, loss_mask)


def _fused_bwd(vocab_major, chunk, softcap, res, g):
    grad, weight, input_ids, loss_mask = res
    zero = lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.floating) else _int_ct(x)
    # the output projection is frozen: its cotangent is zero by contract (see module docstring)
    return (g * grad).astype(grad.dtype), jnp.zeros_like(weight), zero(input_ids), zero(loss_mask)


def _int_ct(x):
    import numpy as np

    return np.zeros(x.shape, jax.dtypes.float0)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_token_nll(hidden, weight, input_ids, loss_mask, *, vocab_major: bool = True,
                    chunk: int | None = None, softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
    """(summed NLL, target-token count) in float32 of ``logits = hidden @ W``; position t predicts t+1.

    ``hidden`` [B, T, H] in the compute dtype; ``weight`` the frozen output projection, [V, H]
    (a tied embedding, ``vocab_major``) or [H, V] (an lm_head kernel). ``loss_mask[t] = 1``
    where token t is a target. ``softcap``: logits soft-capped as ``cap * tanh(logits / cap)``.
    """
    vocab = weight.shape[0] if vocab_major else weight.shape[1]
    b, t, _ = hidden.shape
    chunk = chunk or default_chunk(vocab, b * (t - 1))
    total = _fused(hidden, lax.stop_gradient(weight), input_ids, loss_mask, vocab_major, chunk, softcap)
    return total, jnp.sum(loss_mask[:, 1:].astype(jnp.float32))


def token_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed NLL, target-token count) in float32; position t predicts token t+1.

    ``loss_mask[t] = 1`` where token t is a target (so the prompt, padding and the first token
    never count).
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    w = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)


def fused_head(model, lora) -> tuple[str, bool] | None:
    """(where the output projection lives, vocab_major) when ``model`` can use the fused loss, else None.

    The project's ports (decoder, GPT-2) qualify unless the adapter targets ``lm_head``.
    """
    if not fused_enabled() or type(model.module) not in _TIED_EMBEDDING or "lm_head" in (lora or {}):
        return None
    if getattr(model.config, "tie_word_embeddings", False):
        return "embed", True
    return "lm_head", False


def model_token_nll(model, variables, batch, *, rngs=None, chunk: int | None = None):
    """(summed NLL, target count) of ``model`` on ``batch``: fused when possible, else via logits.

    A packed batch (``segment_ids``, ``position_ids``: :func:`flax_lora.models.base.packed_inputs`)
    is passed on to the model, which confines attention to each example; the loss itself needs
    nothing more, since each packed example's first token already has loss mask 0.
    """
    packed = packed_inputs(batch)
    head = fused_head(model, variables.get("lora"))
    if head is None:
        logits = model.logits(variables, batch["input_ids"], batch["attention_mask"], rngs=rngs, **packed)
        return token_nll(logits, batch["input_ids"], batch["loss_mask"])
    ids, mask = batch["input_ids"].astype(jnp.int32), batch["attention_mask"].astype(jnp.int32)
    pos = packed.pop("position_ids", None)
    if pos is None:
        pos = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
    # the logits output is unused and removed by XLA; hidden_states[-1] is the final-norm output
    _, hidden = model.module.apply(variables, ids, mask, position_ids=pos, deterministic=True,
                                   output_hidden_states=True, return_dict=False, rngs=rngs, **packed)
    params = variables["params"]
    if head[0] == "embed":
        a, b, c = _TIED_EMBEDDING[type(model.module)]
        weight = params[a][b][c]
    else:
        weight = params["lm_head"]["kernel"]
    return fused_token_nll(hidden[-1], weight, ids, batch["loss_mask"], vocab_major=head[1], chunk=chunk,
                           softcap=getattr(model.config, "final_logit_softcapping", None))
