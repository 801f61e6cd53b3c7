"""LoRA as a transform of a frozen Flax model.

The adapter is a separate pytree, ``lora``, that mirrors the model's ``params`` tree but
holds, for each adapted linear module, ``{"a": [in, r], "b": [r, out]}``. It is passed to
``module.apply`` as its own variable collection, and an interceptor
(``flax.linen.intercept_methods``) adds ``scaling * dropout(x) @ a @ b`` to the output of
every ``nn.Dense`` / GPT-2 ``FlaxConv1D`` that owns such a variable. Nothing in
transformers' code is edited, the frozen weights never enter the gradient, and under
``nn.scan`` the collection is sliced per layer like the params are.

``y = x W + scaling * x A B`` with ``scaling = alpha / r`` (or ``alpha / sqrt(r)`` for
rsLoRA); A is Kaiming-uniform like PEFT's, B is zero, so an untrained adapter is the
identity on the base model.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from flax_lora.errors import UserError
from flax_lora.matmul import matmul

LORA = "lora"  # variable collection that holds the adapter
DROPOUT_RNG = "lora_dropout"  # rng stream for dropout on the LoRA input path

Kind = Literal["dense", "conv1d"]


@dataclass(frozen=True)
class LinearInfo:
    """A linear module found in the model: its kernel layout and feature sizes.

    ``dense`` kernels are stored [in, out] (flax); ``conv1d`` (GPT-2) kernels [out, in].
    """

    path: str
    kind: Kind
    in_features: int
    out_features: int


@dataclass(frozen=True)
class LoraConfig:
    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _linear_kind(module: nn.Module) -> Kind | None:
    if isinstance(module, nn.Dense):
        return "dense"
    from flax_lora.quant import CONV1D_CLASSES

    if type(module).__name__ in CONV1D_CLASSES:  # GPT-2's Conv1D (the port's or transformers'), kernel [out, in]
        return "conv1d"
    return None


def _path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.scope.path)


def discover_linears(apply_fn, *args, **kwargs) -> dict[str, LinearInfo]:
    """All linear modules ``apply_fn(*args, **kwargs)`` calls, found by abstract evaluation.

    ``apply_fn`` is a callable that runs ``module.apply(...)``; nothing is computed
    (``jax.eval_shape``), so this is cheap even for large models.
    """
    found: dict[str, LinearInfo] = {}

    def record(next_fun, f_args, f_kwargs, context):
        out = next_fun(*f_args, **f_kwargs)
        kind = _linear_kind(context.module) if context.method_name == "__call__" else None
        path = _path(context.module) if kind else ""
        if kind and path:  # unbound helper applies (e.g. a tied lm_head) have no path
            found[path] = LinearInfo(path, kind, f_args[0].shape[-1], out.shape[-1])
        return out

    def run(*a, **k):
        with nn.intercept_methods(record):
            return apply_fn(*a, **k)

    jax.eval_shape(run, *args, **kwargs)
    return found


def select_targets(
    linears: Mapping[str, LinearInfo], targets: Iterable[str] | str
) -> dict[str, LinearInfo]:
    """Linears whose path matches ``targets``.

    ``targets`` is a list of module names with PEFT's ``target_modules`` rule (a name matches
    a module whose path equals it or ends with it on a module boundary; dots or slashes
    separate: ``c_proj`` matches GPT-2's ``attn/c_proj`` and ``mlp/c_proj``, ``attn.c_proj``
    only the first) or one regex string matched against the full ``/``-joined path (like
    PEFT's regex form). Matching nothing is an error that lists the module names that exist.
    """
    if isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = {p: i for p, i in linears.items() if pattern.fullmatch(p)}
    else:
        suffixes = ["/" + t.replace(".", "/") for t in targets]
        chosen = {p: i for p, i in linears.items() if any(("/" + p).endswith(s) for s in suffixes)}
    if not chosen:
        existing = sorted({p.rsplit("/", 1)[-1] for p in linears})
        raise UserError(
            f"target modules {targets!r} match no linear layer; this model has: {', '.join(existing)}"
        )
    return dict(sorted(chosen.items()))


def init_lora(targets: Mapping[str, LinearInfo], r: int, key: jax.Array) -> dict:
    """A fresh adapter: A ~ Kaiming-uniform(a=sqrt(5)) as in PEFT (bound 1/sqrt(in)), B = 0."""
    flat = {}
    keys = jax.random.split(key, max(len(targets), 1))
    for k, (path, info) in zip(keys, sorted(targets.items())):
        bound = 1.0 / math.sqrt(info.in_features)
        a = jax.random.uniform(k, (info.in_features, r), jnp.float32, -bound, bound)
        b = jnp.zeros((r, info.out_features), jnp.float32)
        flat[tuple(path.split("/")) + ("a",)] = a
        flat[tuple(path.split("/")) + ("b",)] = b
    return unflatten_dict(flat)


def lora_paths(lora: Mapping) -> list[str]:
    """The module paths an adapter tree adapts, sorted."""
    return sorted({"/".join(k[:-1]) for k in flatten_dict(lora)})


def make_interceptor(scaling: float, dropout: float = 0.0, deterministic: bool = True):
    """An interceptor adding the LoRA path to every linear that has a ``lora`` variable."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        frozen = None
        if context.method_name == "__call__":
            from flax_lora.quant import frozen_call  # int8 / NF4 frozen kernels (flax_lora.quant, .nf4)

            frozen = frozen_call(module)
        y = frozen(module, args[0]) if frozen is not None else next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not module.has_variable(LORA, "a"):
            return y
        x = args[0]
        a = module.get_variable(LORA, "a")
        b = module.get_variable(LORA, "b")
        if dropout > 0.0 and not deterministic:
            keep = jax.random.bernoulli(module.make_rng(DROPOUT_RNG), 1.0 - dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
        dtype = y.dtype
        delta = matmul(matmul(x.astype(dtype), a.astype(dtype)), b.astype(dtype))
        return y + (scaling * delta).astype(dtype)

    return intercept


@contextlib.contextmanager
def lora_active(scaling: float, dropout: float = 0.0, deterministic: bool = True) -> Iterator[None]:
    """Context in which ``module.apply({"params": p, "lora": l}, ...)`` runs with the adapter."""
    with nn.intercept_methods(make_interceptor(scaling, dropout, deterministic)):
        yield


def merge(params: Mapping, lora: Mapping, scaling: float, linears: Mapping[str, LinearInfo]) -> dict:
    """Frozen params with ``W + scaling * A B`` folded in (kernel layout respected)."""
    flat = dict(flatten_dict(params))
    lflat = flatten_dict(lora)
    for path in lora_paths(lora):
        key = tuple(path.split("/"))
        a, b = lflat[key + ("a",)], lflat[key + ("b",)]
        kernel = flat[key + ("kernel",)]
        delta = scaling * (a.astype(jnp.float32) @ b.astype(jnp.float32))
        if linears[path].kind == "conv1d":
            delta = delta.T
        flat[key + ("kernel",)] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return unflatten_dict(flat)


def count_params(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
