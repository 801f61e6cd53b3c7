"""Request -> Advice: the guide's rules as a pipeline of small named rules, one reason per value.

Each rule is a function ``rule_x(ctx) -> Decision``: it reads the :class:`Context` (the request,
the recipe and what earlier rules decided) and returns the values it decides, a reason for each
advised value and any warnings. :func:`advise` runs :data:`PIPELINE` in order, folding each
decision into the context, and assembles the :class:`Advice` from the final context; the reasons
and warnings come out in pipeline order:

model shape -> data (samples, lengths) -> rank -> alpha (+ scaling) -> dropout -> target modules
-> max length -> precision -> learning rate -> frozen weights split over the GPUs -> quantization
-> gradient checkpointing -> batch size
-> accumulation (+ effective batch) -> epochs -> total steps -> schedule -> warmup -> weight decay
and gradient clipping -> memory estimate (+ remedies when batch 1 does not fit) -> data summary.

The order matters where the memory model is asked: splitting the frozen weights over several GPUs
is judged on a full bf16/fp32 copy, quantization with that split and without gradient
checkpointing, checkpointing with the chosen quantization, and the batch with all of them.

Precedence for every value: an explicit request field, then what the user told us about the
data (``noisy``, ``text_length``, a data file), then the recipe, then the guide's rule.
Conflicts inside the guide are resolved as documented in ``RESOLUTIONS.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

from pydantic import ValidationError

from advisor import catalog, data_stats, memory
from advisor import tables as T
from advisor.errors import AdviceError
from advisor.memory import GIB, Setup
from advisor.schema import (
    Advice,
    AdviceRequest,
    DataStats,
    LoraAdvice,
    MemoryEstimate,
    ModelShape,
    Reason,
    TrainingAdvice,
)


def make_request(request: AdviceRequest | None = None, **fields) -> AdviceRequest:
    """An AdviceRequest from a request or keyword fields; invalid input -> AdviceError."""
    if request is not None:
        if fields:
            raise AdviceError("pass either a request or keyword fields, not both")
        if not isinstance(request, AdviceRequest):
            raise AdviceError(f"expected an AdviceRequest, got {type(request).__name__}")
        return request
    try:
        return AdviceRequest(**fields)
    except ValidationError as exc:
        raise AdviceError(validation_message(exc)) from None


def validation_message(exc: ValidationError) -> str:
    """pydantic's errors as one line: "samples: Input should be greater than 0; ..."."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


# --------------------------------------------------------------------------- context, decisions


@dataclass(frozen=True)
class Context:
    """The request and everything the rules so far decided (None / empty until decided).

    ``remat`` is False until the gradient-checkpointing rule turns it on: the rules before it
    ask the memory model about a setup without checkpointing.
    """

    request: AdviceRequest
    recipe: T.Recipe | None = None
    shape: ModelShape | None = None
    samples: int | None = None
    lengths: list[int] | None = None  # per-sample lengths of the data file, when one is given
    tokenizer: Path | None = None  # the model's tokenizer.json the lengths were counted with
    measured: Any = None  # advisor.data_stats.Measured of the data file
    r: int | None = None
    alpha: float | None = None
    scaling: float | None = None
    dropout: float | None = None
    targets: tuple[str, ...] = ()
    preset: str | None = None
    max_length: int | None = None
    precision: str | None = None
    learning_rate: float | None = None
    quantization: str | None = None
    shard_frozen: bool = False  # frozen weights split over the GPUs (decided before quantization)
    remat: bool = False
    batch: int | None = None
    accum: int | None = None
    effective: int | None = None
    epochs: int | None = None
    total_steps: int | None = None
    schedule: str | None = None
    warmup: int | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    packing: bool = False
    memory: MemoryEstimate | None = None
    trainable: int | None = None
    stats: DataStats | None = None

    @classmethod
    def of(cls, request: AdviceRequest) -> "Context":
        """The starting context: the request and its recipe, nothing decided yet."""
        return cls(request=request, recipe=T.RECIPES[request.recipe] if request.recipe else None)


@dataclass(frozen=True)
class Decision:
    """What one rule decided: Context fields to set, a reason per advised value, warnings."""

    values: dict[str, Any]
    reasons: tuple[Reason, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def value(self) -> Any:
        """The decided value, for a rule that decides exactly one."""
        (value,) = self.values.values()
        return value

    @property
    def why(self) -> str:
        """The reason for the rule's (first) advised value."""
        return self.reasons[0].why


def reason(field: str, value: Any, why: str) -> Reason:
    """A Reason with the value as the advice prints it (floats in ``g`` format)."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return Reason(field=field, value=text, why=why)


def decide(name: str, field: str, value: Any, why: str, warnings: Iterable[str] = ()) -> Decision:
    """A Decision for one value: Context field ``name``, advised as ``field``."""
    return Decision({name: value}, (reason(field, value, why),), tuple(warnings))


def _gb(x: float) -> str:
    return f"{x:.2f} GB"


def setup_of(ctx: Context, batch: int, quant: str | None = None, *, length: int | None = None,
             rank: int | None = None, remat: bool | None = None, shard: bool | None = None) -> Setup:
    """The memory model's Setup for ``ctx``'s choices at ``batch``, with any of them overridden."""
    return Setup(ctx.r if rank is None else rank, ctx.targets, batch,
                 ctx.max_length if length is None else length, ctx.precision,
                 ctx.quantization if quant is None else quant, remat=ctx.remat if remat is None else remat,
                 packing=packing_choice(ctx)[0], gpus=ctx.request.gpus,
                 shard_frozen=ctx.shard_frozen if shard is None else shard)


def need_gb(ctx: Context, batch: int, quant: str | None = None, **overrides) -> float:
    """GiB per GPU that :func:`setup_of` (same arguments) needs, by the memory model."""
    return sum(memory.breakdown(ctx.shape, setup_of(ctx, batch, quant, **overrides)).values()) / GIB


# --------------------------------------------------------------------------- model and data


def rule_model(ctx: Context) -> Decision:
    """The model's shape: catalog entry, local config, size class or the reference model."""
    shape, source = catalog.resolve(ctx.request.model, ctx.request.model_params)
    return Decision({"shape": shape}, (reason("model", shape.name, source),))


def _read_data(req: AdviceRequest):
    """``req.data`` measured as the trainer builds it (with the model's tokenizer and chat template
    when they are available offline), and the warnings it gives."""
    folder = catalog.model_dir(req.model) if req.model else None
    measured = data_stats.measure(req.data, folder, data_format=req.data_format, input_field=req.input_field,
                                  target_field=req.target_field, chat_template=req.chat_template)
    report = measured.report
    warnings = [f"{req.data}: {report.summary()}; lora train skips the same rows"] if report.bad else []
    return measured, warnings


def rule_data(ctx: Context) -> Decision:
    """Samples and lengths: a given ``samples`` wins (with a warning when the file disagrees)."""
    req = ctx.request
    measured, warnings = None, []
    if req.data is not None:
        measured, warnings = _read_data(req)
    lengths = measured.lengths if measured else None
    samples = req.samples if req.samples is not None else len(lengths)
    reasons = ()
    if req.samples is None:
        reasons = (reason("samples", samples, f"counted in {req.data} (format {measured.fmt.describe()})"),)
    elif lengths is not None and len(lengths) != req.samples:
        warnings.append(f"--samples {req.samples} differs from the {len(lengths)} samples in {req.data}; "
                        f"advised for {req.samples}")
    tokenizer = measured.tokenizer if measured else None
    return Decision({"samples": samples, "lengths": lengths, "tokenizer": tokenizer, "measured": measured},
                    reasons, tuple(warnings))


def rule_examples(ctx: Context) -> Decision:
    """A text corpus trains in windows of max_length: the examples per epoch are the windows."""
    m = ctx.measured
    if m is None or ctx.request.samples is not None or m.fmt.kind != "text":
        return Decision({})
    n = data_stats.windows(m.lengths, ctx.max_length)
    if n == ctx.samples:
        return Decision({})
    return decide("samples", "examples", n, f"{ctx.samples} documents split into windows of max_length "
                  f"{ctx.max_length} (every token trained once) -> {n} examples")


# --------------------------------------------------------------------------- LoRA


def rule_rank(ctx: Context) -> Decision:
    """r: given, else the recipe's, else "Choosing rank" by task."""
    req, recipe = ctx.request, ctx.recipe
    if req.r is not None:
        r, why = req.r, "given"
    elif recipe is not None:
        r, why = recipe.r, f"recipe {recipe.name!r}: r = {recipe.r}"
    else:
        r, line = T.RANK_BY_TASK[req.task]
        why = f'"Choosing rank" for task {req.task!r}: {line} (rank table: {T.RANK_TABLE[r][2]})'
    return decide("r", "lora.r", r, why)


def rule_alpha(ctx: Context) -> Decision:
    """alpha (and scaling = alpha / r): given, a style, the recipe's ratio, else the standard 2 x r."""
    req, recipe, r = ctx.request, ctx.recipe, ctx.r
    if req.alpha is not None:
        alpha, why = req.alpha, "given"
    elif req.style is not None:
        k = T.ALPHA_STYLES[req.style]
        alpha, why = k * r, f'"Alpha" style {req.style!r}: alpha = {k:g} x r'
    elif recipe is not None:
        k = recipe.alpha / recipe.r
        alpha = k * r
        why = (f"recipe {recipe.name!r} keeps its own alpha = {k:g} x r (the guide's 'aggressive'), "
               "not the 'standard' 2 x r; pass --style to change it")
    else:
        k = T.ALPHA_STYLES[T.DEFAULT_STYLE]
        alpha, why = k * r, f'"Alpha": Standard (recommended) alpha = {k:g} x r'
    scaling = alpha / r
    return Decision({"alpha": alpha, "scaling": scaling},
                    (reason("lora.alpha", alpha, why),
                     reason("lora.scaling", scaling, f'"Formula": scaling = alpha / r = {alpha:g} / {r}')))


def rule_dropout(ctx: Context) -> Decision:
    """dropout: given, noisy data (0.2, over recipe and size), the recipe's, else by dataset size."""
    req, recipe = ctx.request, ctx.recipe
    if req.dropout is not None:
        dropout, why = req.dropout, "given"
    elif req.noisy:
        dropout, why = T.DROPOUT_NOISY, '"Choosing dropout": noisy data -> 0.2 (overrides recipe and size)'
    elif recipe is not None:
        dropout, why = recipe.dropout, f"recipe {recipe.name!r}: dropout {recipe.dropout:g}"
    else:
        row, dropout = T.size_row(T.DROPOUT_BY_SIZE, ctx.samples)
        why = f'"Choosing dropout": {row.label} -> {dropout:g} ({T.DROPOUT_VALUES[dropout]})'
    return decide("dropout", "lora.dropout", dropout, why)


def resolve_targets(req: AdviceRequest, shape: ModelShape) -> tuple[tuple[str, ...], str | None, str]:
    """(module names, preset or None, reason)."""
    known = shape.source in ("catalog", "config")
    where = f"{shape.model_type} names" if known else f"the {shape.model_type}-style names of the assumed shape"
    given = req.target_modules
    if given is None or isinstance(given, str):
        preset = given or T.DEFAULT_TARGET_PRESET
        names = catalog.preset_modules(shape.model_type, preset)
        label = T.TARGET_PRESETS[preset][1]
        why = f'"Target Modules": {label}' + (" (default)" if given is None else "") + f", as {where}"
        return names, preset, why
    available = {name for name, _, _ in catalog.linear_layers(shape)}
    unknown = [n for n in given if not any(catalog.name_matches(a, n) for a in available)]
    if unknown and known:
        raise AdviceError(f"target module(s) {', '.join(unknown)} not in {shape.name}; "
                          f"it has: {', '.join(sorted(available))}")
    return tuple(given), None, "given"


def rule_targets(ctx: Context) -> Decision:
    """Target modules: a preset as the model's own names, or given names checked against the model."""
    targets, preset, why = resolve_targets(ctx.request, ctx.shape)
    return Decision({"targets": targets, "preset": preset},
                    (reason("lora.target_modules", ",".join(targets), why),))


# --------------------------------------------------------------------------- sequence, precision, rate


def choose_max_length(req: AdviceRequest, recipe, lengths: list[int] | None,
                      unit: str = "tokens") -> tuple[int, str]:
    """max_length: given, the data's 95th percentile, the text-length class, the recipe, else medium."""
    if req.max_length is not None:
        return req.max_length, "given"
    if lengths:
        p = data_stats.percentile(lengths, T.LENGTH_PERCENTILE)
        value = max(T.LENGTH_MULTIPLE, math.ceil(p / T.LENGTH_MULTIPLE) * T.LENGTH_MULTIPLE)
        return value, (f"{T.LENGTH_PERCENTILE}th percentile of the data's lengths is {p} {unit}, "
                       f"rounded up to a multiple of {T.LENGTH_MULTIPLE}")
    if req.text_length is not None:
        value, label = T.MAX_LENGTH_BY_TEXT[req.text_length]
        return value, f'"Choosing max length": {label} -> {value}'
    if recipe is not None:
        return recipe.max_length, f"recipe {recipe.name!r}: max length {recipe.max_length}"
    value, label = T.MAX_LENGTH_BY_TEXT[T.DEFAULT_TEXT_LENGTH]
    return value, (f'no text length or data given: "Choosing max length" {label} -> {value}; '
                   "pass --text-length or --data")


def rule_max_length(ctx: Context) -> Decision:
    """max_length by :func:`choose_max_length`, capped at the model's positions (a warning if given)."""
    req, shape = ctx.request, ctx.shape
    unit = "tokens" if ctx.tokenizer else f"tokens (estimated at {data_stats.CHARS_PER_TOKEN:g} chars/token)"
    max_length, why = choose_max_length(req, ctx.recipe, ctx.lengths, unit)
    warnings = []
    if max_length > shape.max_positions:
        note = f"{max_length} exceeds {shape.name}'s {shape.max_positions} positions: capped"
        if req.max_length is not None:
            warnings.append(f"max_length {note}")
        max_length, why = shape.max_positions, f"{why}; {note}"
    return decide("max_length", "training.max_length", max_length, why, warnings)


def rule_precision(ctx: Context) -> Decision:
    """Precision: given, else bf16 (the guide's fp16 without its overflow)."""
    req = ctx.request
    return decide("precision", "training.precision", req.precision or T.DEFAULT_PRECISION,
                  "given" if req.precision else (
                      '"Mixed Precision": the guide enables fp16 on CUDA; bf16 has the same 2 bytes and speed '
                      "with fp32's exponent range, so it needs no loss scaling (fp16 can overflow)"))


def rule_learning_rate(ctx: Context) -> Decision:
    """Learning rate: given, the recipe's, halved for 7B-class models, else the LoRA standard 2e-4."""
    req, recipe, shape = ctx.request, ctx.recipe, ctx.shape
    if req.learning_rate is not None:
        lr, why = req.learning_rate, "given"
    elif recipe is not None:
        lr, why = recipe.learning_rate, f"recipe {recipe.name!r}: learning rate {recipe.learning_rate:g}"
    elif shape.params >= T.LARGE_MODEL_PARAMS:
        lr = T.LARGE_MODEL_LEARNING_RATE
        why = (f"{shape.params / 1e9:.1f}B params is the guide's 'Large (7B)' class: 2e-4 halved to 1e-4 "
               f"({T.LEARNING_RATES[lr]}); 1e-5 is for full fine-tuning, too low for LoRA")
    else:
        lr = T.DEFAULT_LEARNING_RATE
        why = f'"Learning Rate" table: {lr:g} {T.LEARNING_RATES[lr]}'
    return decide("learning_rate", "training.learning_rate", lr, why)


# --------------------------------------------------------------------------- fitting in memory


def rule_shard_frozen(ctx: Context) -> Decision:
    """Split the frozen weights over the GPUs (lora train --shard-frozen): given, else on when
    there are several GPUs and batch 1 does not fit with a full copy on each. The first rung of
    the ladder: it costs communication (each layer's weights gathered while it computes), not
    accuracy, so it comes before int8 and nf4. Not in the guide."""
    req, vram, field = ctx.request, ctx.request.vram_gb, "training.shard_frozen"
    if req.shard_frozen is not None:
        why = "given" if req.gpus > 1 or not req.shard_frozen else "given; a single GPU has nothing to split across"
        return decide("shard_frozen", field, bool(req.shard_frozen) and req.gpus > 1, why)
    if req.gpus == 1:
        return decide("shard_frozen", field, False, "one GPU: a full copy of the frozen weights (nothing to split across)")
    whole = need_gb(ctx, 1, T.DEFAULT_QUANTIZATION, shard=False)
    if whole <= vram:
        return decide("shard_frozen", field, False, f"off: batch 1 fits with a full copy of the frozen weights on "
                      f"each GPU ({_gb(whole)} of {vram:g} GB)")
    parts = memory.frozen_parts(ctx.shape, setup_of(ctx, 1, T.DEFAULT_QUANTIZATION, shard=True))
    full = memory.frozen_weight_bytes(ctx.shape, ctx.precision, T.DEFAULT_QUANTIZATION) / GIB
    split = need_gb(ctx, 1, T.DEFAULT_QUANTIZATION, shard=True)
    why = (f"batch 1 needs {_gb(whole)} > {vram:g} GB with a full copy of the frozen weights ({_gb(full)}) on "
           f"each GPU; split over the {req.gpus} GPUs each holds {_gb(parts['frozen_weights'] / GIB)} plus one "
           f"layer gathered at a time ({_gb(parts['frozen_gathered'] / GIB)}): batch 1 needs {_gb(split)} "
           "(lora train --shard-frozen; not in the guide)")
    return decide("shard_frozen", field, True, why)


def rule_quantization(ctx: Context) -> Decision:
    """Quantization: given, else off unless batch 1 does not fit, then int8 (the guide's
    load_in_8bit), and nf4 (QLoRA, not in the guide) only when int8 does not fit batch 1 either;
    each step with its saving and a warning."""
    req, vram, field = ctx.request, ctx.request.vram_gb, "training.quantization"
    if req.quantization is not None:
        return decide("quantization", field, req.quantization, "given")
    plain_b1 = need_gb(ctx, 1, T.DEFAULT_QUANTIZATION)
    if plain_b1 <= vram:
        return decide("quantization", field, T.DEFAULT_QUANTIZATION, '"Model Quantization": off while the model fits')
    int8_b1 = need_gb(ctx, 1, "int8")
    why = (f"batch 1 needs {_gb(plain_b1)} in {ctx.precision} > {vram:g} GB: int8 frozen weights "
           f"(the guide's load_in_8bit) save {_gb(plain_b1 - int8_b1)}")
    warning = (f"the model does not fit in {ctx.precision} even at batch 1 ({_gb(plain_b1)} > {vram:g} GB): "
               f"advised int8 quantization, saving {_gb(plain_b1 - int8_b1)}")
    if int8_b1 <= vram:
        return decide("quantization", field, "int8", why, [warning])
    nf4_b1 = need_gb(ctx, 1, "nf4")
    why = (f"{why}; batch 1 still needs {_gb(int8_b1)} with int8 > {vram:g} GB: nf4 frozen weights (QLoRA's "
           f"NormalFloat-4, 4 bits and a scale per 64 weights; not in the guide: QLoRA) save {_gb(int8_b1 - nf4_b1)} more")
    warning = (f"the model does not fit even at batch 1 with int8 weights ({_gb(int8_b1)} > {vram:g} GB): advised "
               f"nf4 quantization (QLoRA, not in the guide), saving {_gb(plain_b1 - nf4_b1)} in all")
    return decide("quantization", field, "nf4", why, [warning])


def rule_gradient_checkpointing(ctx: Context) -> Decision:
    """Gradient checkpointing: on when batch 1 still does not fit with the chosen quantization.

    Not in the guide: recomputing each layer's activations in the backward pass (about a third
    more compute) is the next lever after int8 and nf4; only the project's decoder port has it.
    The user's explicit choice wins; it is refused for model types without it.
    """
    req, vram, quant, field = ctx.request, ctx.request.vram_gb, ctx.quantization, "training.gradient_checkpointing"
    available = ctx.shape.model_type in memory.PORT_TYPES
    b1 = need_gb(ctx, 1, remat=False)
    if b1 > vram and available and req.gradient_checkpointing is not False:
        saves = b1 - need_gb(ctx, 1, remat=True)
        why = (f"batch 1 needs {_gb(b1)} > {vram:g} GB with {quant} weights: recomputing "
               f"each layer's activations in the backward pass saves {_gb(saves)} "
               "for about a third more compute (not in the guide)")
        return decide("remat", field, True, why, [f"advised gradient checkpointing (lora train --remat): {why}"])
    unavailable = f"not available for model type {ctx.shape.model_type} (transformers' Flax class has none)"
    if req.gradient_checkpointing is not None:
        remat = bool(req.gradient_checkpointing) and available
        why = "given" if remat or not req.gradient_checkpointing else f"asked for, but {unavailable}"
        return decide("remat", field, remat, why)
    if available:
        return decide("remat", field, False, "off: batch 1 fits without recomputing activations")
    return decide("remat", field, False, f"off: {unavailable}")


def _batch_ceiling(req: AdviceRequest, recipe) -> tuple[int, str]:
    """The largest batch the recipe or the guide's VRAM table allows, and why."""
    if recipe is not None:
        return recipe.batch_size, f"recipe {recipe.name!r}: batch size {recipe.batch_size}"
    rows = [row for row in T.BATCH_BY_VRAM if row.vram_gb <= req.vram_gb]
    if not rows:
        low = T.RECIPES[T.LOW_VRAM_RECIPE]
        return low.batch_size, (f"below the batch table's {T.BATCH_BY_VRAM[0].vram_gb:g} GB row: "
                                f"recipe {low.name!r} ({low.best_for}) uses batch {low.batch_size}")
    row = rows[-1]
    lo, hi = row.max_batch
    return hi, f'batch table row "{row.vram_gb:g}GB, {row.model_size}": max batch {lo}-{hi}'


def halve_to_fit(ctx: Context, top: int) -> int:
    """The first of top, top/2, top/4, ... (integer halving) that fits; 1 when none does."""
    tried = [b for b in (top >> i for i in range(top.bit_length())) if b >= 1]
    return next((b for b in tried if need_gb(ctx, b) <= ctx.request.vram_gb), 1)


def _given_batch(ctx: Context) -> Decision:
    """A given batch size, with a warning naming the largest that fits when it does not."""
    batch, vram = ctx.request.batch_size, ctx.request.vram_gb
    warnings = []
    if need_gb(ctx, batch) > vram and need_gb(ctx, 1) <= vram:
        fit = next(b for b in range(batch, 0, -1) if need_gb(ctx, b) <= vram)
        warnings.append(f"batch {batch} needs {_gb(need_gb(ctx, batch))} > {vram:g} GB; batch {fit} would fit")
    return decide("batch", "training.per_device_batch_size", batch, "given", warnings)


def rule_batch_size(ctx: Context) -> Decision:
    """Per-device batch: the recipe's or the VRAM table's ceiling, capped by the samples per GPU,
    halved until the memory model says it fits."""
    req = ctx.request
    if req.batch_size is not None:
        return _given_batch(ctx)
    ceiling, why = _batch_ceiling(req, ctx.recipe)
    top = min(ceiling, math.ceil(ctx.samples / req.gpus))
    batch = halve_to_fit(ctx, top)
    if top < ceiling:
        why += f"; capped at {top} by {ctx.samples} samples over {req.gpus} GPU(s)"
    if batch < top:
        why += (f"; batch {top} needs {_gb(need_gb(ctx, top))} at max_length {ctx.max_length} "
                f"> {req.vram_gb:g} GB, halved to the largest that fits: {batch}")
    else:
        why += f"; the memory model confirms {batch} fits"
    return decide("batch", "training.per_device_batch_size", batch, why)


# --------------------------------------------------------------------------- steps and schedule


def rule_accumulation(ctx: Context) -> Decision:
    """Gradient accumulation to reach the guide's effective batch of 16 (or all samples), and the
    effective batch = batch x accumulation x GPUs."""
    req, batch = ctx.request, ctx.batch
    if req.gradient_accumulation_steps is not None:
        accum, why = req.gradient_accumulation_steps, "given"
    else:
        target = min(T.TARGET_EFFECTIVE_BATCH, ctx.samples)
        accum = max(1, math.ceil(target / (batch * req.gpus)))
        why = (f'"Effective batch size" example 4 x {T.DEFAULT_GRAD_ACCUMULATION} = {T.TARGET_EFFECTIVE_BATCH}: '
               f"accumulate to reach {target} -> ceil({target} / ({batch} x {req.gpus} GPU)) = {accum}")
    effective = batch * accum * req.gpus
    return Decision({"accum": accum, "effective": effective}, (
        reason("training.gradient_accumulation_steps", accum, why),
        reason("training.effective_batch_size", effective,
               f'"Gradient Accumulation": batch x accumulation x GPUs = {batch} x {accum} x {req.gpus}')))


def choose_epochs(samples: int) -> tuple[int, str]:
    """Within the size row's range: the top for its smallest sets, the bottom for its largest,
    interpolated on log(samples) and rounded half up."""
    row, (lo, hi) = T.size_row(T.EPOCHS_BY_SIZE, samples)
    a = row.low if row.low > 0 else T.EPOCHS_OPEN_LOW
    b = row.high - 1 if row.high is not None else T.EPOCHS_OPEN_HIGH
    frac = min(1.0, max(0.0, math.log(max(samples, 1) / a) / math.log(b / a)))
    epochs = math.floor(hi - (hi - lo) * frac + 0.5)
    return epochs, (f'epochs table row "{row.label}": {lo}-{hi}; more samples -> fewer epochs, '
                    f"interpolated on log(samples) over {a:,}-{b:,} ({frac:.2f} of the way) -> {epochs}")


def rule_epochs(ctx: Context) -> Decision:
    """Epochs: given, the recipe's, else the guide's table by dataset size (:func:`choose_epochs`)."""
    req, recipe = ctx.request, ctx.recipe
    if req.epochs is not None:
        epochs, why = req.epochs, "given"
    elif recipe is not None:
        epochs, why = recipe.epochs, f"recipe {recipe.name!r}: {recipe.epochs} epochs"
    else:
        epochs, why = choose_epochs(ctx.samples)
    return decide("epochs", "training.epochs", epochs, why)


def rule_total_steps(ctx: Context) -> Decision:
    """Optimizer steps: ceil(samples / effective batch) per epoch, times the epochs; with packing
    (:func:`packing_choice`) the rows are the packed rows (:func:`packed_rows`)."""
    rows, unit = ctx.samples, "samples"
    if packing_choice(ctx)[0]:
        rows, how = packed_rows(ctx) if ctx.lengths else (ctx.samples, "")
        unit = f"packed rows ({how})" if ctx.lengths else "samples (packed: fewer rows, unknown without --data)"
    steps_per_epoch = math.ceil(rows / ctx.effective)
    total = steps_per_epoch * ctx.epochs
    return decide("total_steps", "training.total_steps", total,
                  f"ceil({rows} {unit} / {ctx.effective}) x {ctx.epochs} epochs = {steps_per_epoch} x {ctx.epochs}")


def rule_schedule(ctx: Context) -> Decision:
    """Learning-rate schedule: given, else the tool's constant rate."""
    req = ctx.request
    return decide("schedule", "training.lr_schedule", req.lr_schedule or T.DEFAULT_SCHEDULE,
                  "given" if req.lr_schedule else '"Learning rate schedule": the tool uses a constant learning rate')


def rule_warmup(ctx: Context) -> Decision:
    """Warmup steps: given, none for a constant rate, else 5% of the steps for a decaying schedule."""
    req = ctx.request
    if req.warmup_steps is not None:
        warmup, why = req.warmup_steps, "given"
    elif ctx.schedule == "constant":
        warmup, why = 0, "constant schedule: no warmup"
    else:
        warmup = math.ceil(T.WARMUP_FRACTION * ctx.total_steps)
        why = f"'Warmup + decay': {T.WARMUP_FRACTION:.0%} of {ctx.total_steps} steps (the guide gives no number)"
    return decide("warmup", "training.warmup_steps", warmup, why)


def rule_regularization(ctx: Context) -> Decision:
    """Weight decay (none) and gradient clipping (at 1.0): the guide names neither value."""
    return Decision({"weight_decay": 0.0, "max_grad_norm": 1.0}, (
        reason("training.weight_decay", 0.0, "the guide sets none; LoRA adapters are small and start at zero"),
        reason("training.max_grad_norm", 1.0,
               "clip at 1.0 (the guide's 'NaN values' sign of a too-high rate; a common LoRA default)")))


PACKING_MEDIAN_FRACTION = 0.25  # advise packing when the median example is under this share of max_length
# Packed rows are estimated at this mean fill: first fit on shuffled short examples fills 94-99% of
# each row (log-normal lengths around 30-200 tokens into 256-2048, 200-5000 examples; simulated
# with flax_lora.data.batch.first_fit), so 0.95 errs slightly towards more steps.
PACKING_FILL = 0.95


class _Examples(NamedTuple):
    count: int
    median: int
    tokens: int
    over_half: int  # examples longer than half a row: none of them shares a row with another


@lru_cache(maxsize=4)
def _example_facts(lengths: tuple[int, ...], max_length: int, corpus: bool) -> _Examples:
    """The examples the trainer builds at ``max_length`` from rows of ``lengths`` tokens (a row cut
    to it, a text document in windows overlapping by one token, as ``advisor.examples.fit``).
    Cached: the memory rules ask :func:`packing_choice` many times."""
    out = []
    for n in lengths:
        if n <= max_length or not corpus:
            out.append(min(n, max_length))
            continue
        c = math.ceil((n - 1) / (max_length - 1))
        out += [max_length] * (c - 1) + [n - (c - 1) * (max_length - 1)]
    return _Examples(len(out), data_stats.percentile(out, 50), sum(out), sum(1 for n in out if 2 * n > max_length))


def _examples_of(ctx: Context) -> _Examples:
    corpus = ctx.measured is not None and ctx.measured.fmt.kind == "text"
    return _example_facts(tuple(ctx.lengths), ctx.max_length, corpus)


def packed_rows(ctx: Context) -> tuple[int, str]:
    """(rows, how) the data file's examples pack into: their tokens over ``max_length`` rows filled
    to :data:`PACKING_FILL`, and at least one row per example longer than half a row. A given
    ``samples`` wins over the file's count: the file's lengths are then scaled to it."""
    ex = _examples_of(ctx)
    scale = ctx.samples / ex.count if ctx.request.samples is not None else 1.0
    tokens, over_half = ex.tokens * scale, ex.over_half * scale
    rows = max(math.ceil(tokens / (ctx.max_length * PACKING_FILL)), math.ceil(over_half), 1)
    fill = f"in rows of {ctx.max_length} at {PACKING_FILL:.0%} fill"
    if scale == 1.0:
        return rows, f"{ex.count} examples, {ex.tokens} tokens {fill}"
    return rows, f"{ctx.samples} samples of the data file's {ex.tokens / ex.count:.0f} tokens on average {fill}"


def packing_choice(ctx: Context) -> tuple[bool, str]:
    """(packing, why): given; else on for a model known to be of the Llama-family port (a catalog
    entry or a config.json: an assumed shape could be trained on a family that cannot pack) when
    the data file's median example is under :data:`PACKING_MEDIAN_FRACTION` of max_length (below
    a quarter, unpacked rows are mostly padding and a packed row holds four or more examples).
    Not in the guide.

    Pure, so the memory rules (explicit attention scores with packing) and the step count ask it
    before :func:`rule_packing` reports it.
    """
    req, model_type = ctx.request, ctx.shape.model_type
    able = model_type in memory.PORT_TYPES
    unable = f"not available for model type {model_type} (transformers' Flax class takes no segment ids)"
    if req.packing and not able:
        return False, f"asked for, but {unable}"
    if req.packing is not None:
        return req.packing, "given"
    if not able:
        return False, f"off: {unable} (not in the guide)"
    if ctx.shape.source not in ("catalog", "config"):
        return False, f"off: the model is not known ({ctx.shape.source} shape): pass --model (not in the guide)"
    if not ctx.lengths:
        return False, "off: no data file to measure (--data); one example per row (not in the guide)"
    ex = _examples_of(ctx)
    share = f"the median example is {ex.median} tokens, {ex.median / ctx.max_length:.0%} of max_length {ctx.max_length}"
    if ex.median >= PACKING_MEDIAN_FRACTION * ctx.max_length:
        return False, (f"off: {share}, not under {PACKING_MEDIAN_FRACTION:.0%}: little padding to save "
                       "(not in the guide)")
    rows, _ = packed_rows(ctx)
    return True, (f"{share}: several examples per row, attention confined to each, train the same tokens in "
                  f"~{rows} rows instead of {ex.count}; attention scores are explicit with packing "
                  "(counted in the memory estimate) (not in the guide)")


def rule_packing(ctx: Context) -> Decision:
    """Sample packing (not in the guide, the trainer's --packing): :func:`packing_choice`, with a
    warning when it was asked for a family that cannot (``lora train --packing`` refuses it)."""
    packing, why = packing_choice(ctx)
    warnings = [f"packing {why}: lora train --packing would refuse it"] if why.startswith("asked") else []
    return decide("packing", "training.packing", packing, why, warnings)


# --------------------------------------------------------------------------- memory and data summary


def fit_remedies(ctx: Context, b1: float) -> list[str]:
    """What would make batch 1 (needing ``b1`` GiB) fit, in order, each with its saving."""
    req, vram, ml, out = ctx.request, ctx.request.vram_gb, ctx.max_length, []
    if ctx.quantization == "none":
        out.append(f"int8 quantization saves {_gb(b1 - need_gb(ctx, 1, 'int8'))}")
    if ctx.quantization in ("none", "int8"):
        out.append(f"nf4 quantization (QLoRA) saves {_gb(b1 - need_gb(ctx, 1, 'nf4'))}")
    if ctx.shape.model_type in memory.PORT_TYPES and not ctx.remat:
        out.append(f"gradient checkpointing (--remat) saves {_gb(b1 - need_gb(ctx, 1, remat=True))}")
    if req.gpus > 1 and not ctx.shard_frozen:
        out.append(f"--shard-frozen over the {req.gpus} GPUs saves {_gb(b1 - need_gb(ctx, 1, shard=True))} per GPU")
    shorter = next((n for n in range(ml - T.LENGTH_MULTIPLE, 0, -T.LENGTH_MULTIPLE)
                    if need_gb(ctx, 1, length=n) <= vram), None)
    shorter = shorter or max(T.LENGTH_MULTIPLE, ml // 2)
    if shorter < ml:
        out.append(f"max_length {ml} -> {shorter} saves {_gb(b1 - need_gb(ctx, 1, length=shorter))}")
    if ctx.r > min(T.RANK_TABLE):
        smaller = max(min(T.RANK_TABLE), ctx.r // 2)
        out.append(f"r {ctx.r} -> {smaller} saves {_gb(b1 - need_gb(ctx, 1, rank=smaller))}")
    return out


def rule_memory(ctx: Context) -> Decision:
    """The memory estimate of the advised setup and its trainable parameters, with warnings when
    even batch 1 does not fit (and the remedies) or the targets match nothing."""
    vram, warnings = ctx.request.vram_gb, []
    b1 = need_gb(ctx, 1)
    if b1 > vram:
        remedies = fit_remedies(ctx, b1)
        warnings.append(f"does not fit even at batch 1: needs {_gb(b1)} of {vram:g} GB. "
                        f"In order: {'; '.join(remedies) or 'nothing left to cut'}; "
                        "else choose a smaller model")
    estimate = memory.estimate(ctx.shape, setup_of(ctx, ctx.batch), vram)
    trainable = memory.trainable_params(ctx.shape, ctx.r, ctx.targets)
    if trainable == 0:
        warnings.append(f"target modules {', '.join(ctx.targets)} match nothing in the assumed "
                        f"{ctx.shape.model_type} shape: trainable params unknown")
    return Decision({"memory": estimate, "trainable": trainable}, (), tuple(warnings))


def rule_data_summary(ctx: Context) -> Decision:
    """The data file's length statistics, with a warning when max_length truncates samples."""
    lengths, tokenizer = ctx.lengths, ctx.tokenizer
    if lengths is None:
        return Decision({"stats": None})
    m = ctx.measured
    corpus = m.fmt.kind == "text"  # documents are split into windows, never cut
    truncated = 0 if corpus else sum(1 for n in lengths if n > ctx.max_length)
    stats = DataStats(
        path=str(ctx.request.data), samples=len(lengths), format=m.fmt.describe(), chat_template=m.template,
        skipped_rows=len(m.report.bad),
        windows=data_stats.windows(lengths, ctx.max_length) if corpus else None,
        length_unit="tokens" if tokenizer else "estimated-tokens",
        tokenizer=str(tokenizer) if tokenizer else None,
        chars_per_token=None if tokenizer else data_stats.CHARS_PER_TOKEN,
        p50=data_stats.percentile(lengths, 50), p95=data_stats.percentile(lengths, 95),
        max=max(lengths), truncated_at_max_length=truncated,
    )
    warnings = ()
    if truncated:
        warnings = (f"max_length {ctx.max_length} truncates {truncated} of {len(lengths)} samples "
                    f"(longest: {max(lengths)} tokens)",)
    return Decision({"stats": stats}, (), warnings)


# --------------------------------------------------------------------------- the pipeline

Rule = Callable[[Context], Decision]

PIPELINE: tuple[Rule, ...] = (
    rule_model,
    rule_data,
    rule_rank,
    rule_alpha,
    rule_dropout,
    rule_targets,
    rule_max_length,
    rule_examples,
    rule_precision,
    rule_learning_rate,
    rule_shard_frozen,
    rule_quantization,
    rule_gradient_checkpointing,
    rule_batch_size,
    rule_accumulation,
    rule_epochs,
    rule_total_steps,
    rule_schedule,
    rule_warmup,
    rule_regularization,
    rule_packing,
    rule_memory,
    rule_data_summary,
)


def run_rules(ctx: Context, rules: Iterable[Rule] = PIPELINE) -> tuple[Context, list[Reason], list[str]]:
    """Apply ``rules`` in order: (final context, reasons, warnings), both in rule order."""
    reasons: list[Reason] = []
    warnings: list[str] = []
    for rule in rules:
        decision = rule(ctx)
        ctx = replace(ctx, **decision.values)
        reasons += decision.reasons
        warnings += decision.warnings
    return ctx, reasons, warnings


def assemble(ctx: Context, reasons: Iterable[Reason], warnings: Iterable[str]) -> Advice:
    """The Advice from a context the whole pipeline has run over."""
    return Advice(
        request=ctx.request,
        model=ctx.shape,
        lora=LoraAdvice(r=ctx.r, alpha=ctx.alpha, dropout=ctx.dropout, target_modules=ctx.targets,
                        target_preset=ctx.preset, scaling=ctx.scaling),
        training=TrainingAdvice(
            epochs=ctx.epochs, per_device_batch_size=ctx.batch, gradient_accumulation_steps=ctx.accum,
            effective_batch_size=ctx.effective, gpus=ctx.request.gpus, learning_rate=ctx.learning_rate,
            lr_schedule=ctx.schedule, warmup_steps=ctx.warmup, max_length=ctx.max_length,
            precision=ctx.precision, quantization=ctx.quantization, gradient_checkpointing=ctx.remat, packing=ctx.packing,
            shard_frozen=ctx.shard_frozen,
            total_steps=ctx.total_steps, weight_decay=ctx.weight_decay, max_grad_norm=ctx.max_grad_norm,
        ),
        memory=ctx.memory,
        trainable_params=ctx.trainable,
        data=ctx.stats,
        reasons=tuple(reasons),
        warnings=tuple(warnings),
    )


def advise(request: AdviceRequest) -> Advice:
    """The advice for a validated request: :data:`PIPELINE` run in order, then assembled."""
    return assemble(*run_rules(Context.of(request)))
