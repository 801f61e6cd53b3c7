"""Request -> Advice: the guide's rules applied in order, one reason per chosen value.

Precedence for every value: an explicit request field, then what the user told us about the
data (``noisy``, ``text_length``, a data file), then the recipe, then the guide's rule.
Conflicts inside the guide are resolved as documented in ``RESOLUTIONS.md``.
"""

from __future__ import annotations

import math
from pathlib import Path

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


class _Reasons(list):
    def add(self, field: str, value, why: str) -> None:
        text = f"{value:g}" if isinstance(value, float) else str(value)
        self.append(Reason(field=field, value=text, why=why))


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


def choose_max_length(req: AdviceRequest, recipe, lengths: list[int] | None,
                      unit: str = "tokens") -> tuple[int, str]:
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


def _batch_ceiling(req: AdviceRequest, recipe) -> tuple[int, str]:
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


def _gb(x: float) -> str:
    return f"{x:.2f} GB"


def advise(request: AdviceRequest) -> Advice:
    req = request
    reasons, warnings = _Reasons(), []
    recipe = T.RECIPES[req.recipe] if req.recipe else None

    shape, source = catalog.resolve(req.model, req.model_params)
    reasons.add("model", shape.name, source)

    # --- data ------------------------------------------------------------------------------
    lengths: list[int] | None = None
    tokenizer: Path | None = None
    fields: tuple[str, ...] = ()
    if req.data is not None:
        pairs, fields = data_stats.sample_texts(req.data)
        folder = catalog.model_dir(req.model) if req.model else None
        if folder is not None and (folder / "tokenizer.json").is_file():
            tokenizer = folder / "tokenizer.json"
        lengths = data_stats.token_lengths(pairs, tokenizer)
    samples = req.samples if req.samples is not None else len(lengths)
    if req.samples is None:
        reasons.add("samples", samples, f"counted in {req.data} (fields: {', '.join(fields)})")
    elif lengths is not None and len(lengths) != req.samples:
        warnings.append(f"--samples {req.samples} differs from the {len(lengths)} samples in {req.data}; "
                        f"advised for {req.samples}")

    # --- LoRA ------------------------------------------------------------------------------
    if req.r is not None:
        r, why = req.r, "given"
    elif recipe is not None:
        r, why = recipe.r, f"recipe {recipe.name!r}: r = {recipe.r}"
    else:
        r, line = T.RANK_BY_TASK[req.task]
        why = f'"Choosing rank" for task {req.task!r}: {line} (rank table: {T.RANK_TABLE[r][2]})'
    reasons.add("lora.r", r, why)

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
    reasons.add("lora.alpha", alpha, why)
    scaling = alpha / r
    reasons.add("lora.scaling", scaling, f'"Formula": scaling = alpha / r = {alpha:g} / {r}')

    if req.dropout is not None:
        dropout, why = req.dropout, "given"
    elif req.noisy:
        dropout, why = T.DROPOUT_NOISY, '"Choosing dropout": noisy data -> 0.2 (overrides recipe and size)'
    elif recipe is not None:
        dropout, why = recipe.dropout, f"recipe {recipe.name!r}: dropout {recipe.dropout:g}"
    else:
        row, dropout = T.size_row(T.DROPOUT_BY_SIZE, samples)
        why = f'"Choosing dropout": {row.label} -> {dropout:g} ({T.DROPOUT_VALUES[dropout]})'
    reasons.add("lora.dropout", dropout, why)

    targets, preset, why = resolve_targets(req, shape)
    reasons.add("lora.target_modules", ",".join(targets), why)

    # --- sequence, precision, learning rate ------------------------------------------------
    unit = "tokens" if tokenizer else f"tokens (estimated at {data_stats.CHARS_PER_TOKEN:g} chars/token)"
    max_length, why = choose_max_length(req, recipe, lengths, unit)
    if max_length > shape.max_positions:
        note = f"{max_length} exceeds {shape.name}'s {shape.max_positions} positions: capped"
        if req.max_length is not None:
            warnings.append(f"max_length {note}")
        max_length, why = shape.max_positions, f"{why}; {note}"
    reasons.add("training.max_length", max_length, why)

    precision = req.precision or T.DEFAULT_PRECISION
    reasons.add("training.precision", precision, "given" if req.precision else (
        '"Mixed Precision": the guide enables fp16 on CUDA; bf16 has the same 2 bytes and speed '
        "with fp32's exponent range, so it needs no loss scaling (fp16 can overflow)"))

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
    reasons.add("training.learning_rate", lr, why)

    # --- batch size and quantization against the memory model -------------------------------
    remat = False  # gradient checkpointing: turned on below only when batch 1 does not fit without it

    def setup(batch: int, quant: str, length: int = max_length, rank: int = r, with_remat: bool | None = None) -> Setup:
        return Setup(rank, targets, batch, length, precision, quant, remat=remat if with_remat is None else with_remat)

    def need(s: Setup) -> float:
        return sum(memory.breakdown(shape, s).values()) / GIB

    vram = req.vram_gb
    quant = req.quantization or T.DEFAULT_QUANTIZATION
    quant_why = "given" if req.quantization else '"Model Quantization": off while the model fits'
    plain_b1 = need(setup(1, quant))
    int8_saves = plain_b1 - need(setup(1, "int8"))
    if plain_b1 > vram and req.quantization is None:
        quant = "int8"
        quant_why = (f"batch 1 needs {_gb(plain_b1)} in {precision} > {vram:g} GB: int8 frozen weights "
                     f"(the guide's load_in_8bit) save {_gb(int8_saves)}")
        warnings.append(f"the model does not fit in {precision} even at batch 1 ({_gb(plain_b1)} > {vram:g} GB): "
                        f"advised int8 quantization, saving {_gb(int8_saves)}")
    reasons.add("training.quantization", quant, quant_why)

    # Not in the guide: recomputing each layer's activations in the backward pass (about a third
    # more compute) is the next lever once batch 1 does not fit; the project's Llama port has it.
    remat_ok = shape.model_type in memory.PORT_TYPES
    if need(setup(1, quant)) > vram and remat_ok and req.gradient_checkpointing is not False:
        remat_saves = need(setup(1, quant)) - need(setup(1, quant, with_remat=True))
        remat_why = (f"batch 1 needs {_gb(need(setup(1, quant)))} > {vram:g} GB with {quant} weights: recomputing "
                     f"each layer's activations in the backward pass saves {_gb(remat_saves)} "
                     "for about a third more compute (not in the guide)")
        warnings.append(f"advised gradient checkpointing (lora train --remat): {remat_why}")
        remat = True
    elif req.gradient_checkpointing is not None:
        remat = bool(req.gradient_checkpointing) and remat_ok
        remat_why = "given" if remat or not req.gradient_checkpointing else (
            f"asked for, but not available for model type {shape.model_type} (transformers' Flax class has none)")
    elif remat_ok:
        remat_why = "off: batch 1 fits without recomputing activations"
    else:
        remat_why = f"off: not available for model type {shape.model_type} (transformers' Flax class has none)"
    reasons.add("training.gradient_checkpointing", remat, remat_why)

    ceiling, ceiling_why = _batch_ceiling(req, recipe)
    per_gpu_samples = math.ceil(samples / req.gpus)
    if req.batch_size is not None:
        batch, batch_why = req.batch_size, "given"
        if need(setup(batch, quant)) > vram and need(setup(1, quant)) <= vram:
            fit = next(b for b in range(batch, 0, -1) if need(setup(b, quant)) <= vram)
            warnings.append(f"batch {batch} needs {_gb(need(setup(batch, quant)))} > {vram:g} GB; "
                            f"batch {fit} would fit")
    else:
        top = min(ceiling, per_gpu_samples)
        tried = [b for b in (top >> i for i in range(top.bit_length())) if b >= 1]
        batch = next((b for b in tried if need(setup(b, quant)) <= vram), 1)
        batch_why = ceiling_why
        if top < ceiling:
            batch_why += f"; capped at {top} by {samples} samples over {req.gpus} GPU(s)"
        if batch < top:
            batch_why += (f"; batch {top} needs {_gb(need(setup(top, quant)))} at max_length {max_length} "
                          f"> {vram:g} GB, halved to the largest that fits: {batch}")
        else:
            batch_why += f"; the memory model confirms {batch} fits"
    reasons.add("training.per_device_batch_size", batch, batch_why)

    final = setup(batch, quant)
    if need(setup(1, quant)) > vram:
        remedies = []
        if quant != "int8":
            remedies.append(f"int8 quantization saves {_gb(need(setup(1, quant)) - need(setup(1, 'int8')))}")
        if remat_ok and not remat:
            remedies.append(f"gradient checkpointing (--remat) saves "
                            f"{_gb(need(setup(1, quant)) - need(setup(1, quant, with_remat=True)))}")
        if req.gpus > 1:
            frozen = memory.breakdown(shape, setup(1, quant))["frozen_weights"] / GIB
            remedies.append(f"--shard-frozen over the {req.gpus} GPUs saves {_gb(frozen * (1 - 1 / req.gpus))} per GPU")
        shorter = next((n for n in range(max_length - T.LENGTH_MULTIPLE, 0, -T.LENGTH_MULTIPLE)
                        if need(setup(1, quant, n)) <= vram), None)
        shorter = shorter or max(T.LENGTH_MULTIPLE, max_length // 2)
        if shorter < max_length:
            remedies.append(f"max_length {max_length} -> {shorter} saves "
                            f"{_gb(need(setup(1, quant)) - need(setup(1, quant, shorter)))}")
        if r > min(T.RANK_TABLE):
            smaller = max(min(T.RANK_TABLE), r // 2)
            remedies.append(f"r {r} -> {smaller} saves "
                            f"{_gb(need(setup(1, quant)) - need(setup(1, quant, rank=smaller)))}")
        warnings.append(f"does not fit even at batch 1: needs {_gb(need(setup(1, quant)))} of {vram:g} GB. "
                        f"In order: {'; '.join(remedies) or 'nothing left to cut'}; "
                        "else choose a smaller model")

    if req.gradient_accumulation_steps is not None:
        accum, why = req.gradient_accumulation_steps, "given"
    else:
        target = min(T.TARGET_EFFECTIVE_BATCH, samples)
        accum = max(1, math.ceil(target / (batch * req.gpus)))
        why = (f'"Effective batch size" example 4 x {T.DEFAULT_GRAD_ACCUMULATION} = {T.TARGET_EFFECTIVE_BATCH}: '
               f"accumulate to reach {target} -> ceil({target} / ({batch} x {req.gpus} GPU)) = {accum}")
    reasons.add("training.gradient_accumulation_steps", accum, why)
    effective = batch * accum * req.gpus
    reasons.add("training.effective_batch_size", effective,
                f'"Gradient Accumulation": batch x accumulation x GPUs = {batch} x {accum} x {req.gpus}')

    # --- epochs, steps, schedule -------------------------------------------------------------
    if req.epochs is not None:
        epochs, why = req.epochs, "given"
    elif recipe is not None:
        epochs, why = recipe.epochs, f"recipe {recipe.name!r}: {recipe.epochs} epochs"
    else:
        epochs, why = choose_epochs(samples)
    reasons.add("training.epochs", epochs, why)

    steps_per_epoch = math.ceil(samples / effective)
    total_steps = steps_per_epoch * epochs
    reasons.add("training.total_steps", total_steps,
                f"ceil({samples} samples / {effective}) x {epochs} epochs = {steps_per_epoch} x {epochs}")

    schedule = req.lr_schedule or T.DEFAULT_SCHEDULE
    reasons.add("training.lr_schedule", schedule,
                "given" if req.lr_schedule else '"Learning rate schedule": the tool uses a constant learning rate')
    if req.warmup_steps is not None:
        warmup, why = req.warmup_steps, "given"
    elif schedule == "constant":
        warmup, why = 0, "constant schedule: no warmup"
    else:
        warmup = math.ceil(T.WARMUP_FRACTION * total_steps)
        why = f"'Warmup + decay': {T.WARMUP_FRACTION:.0%} of {total_steps} steps (the guide gives no number)"
    reasons.add("training.warmup_steps", warmup, why)
    reasons.add("training.weight_decay", 0.0, "the guide sets none; LoRA adapters are small and start at zero")
    reasons.add("training.max_grad_norm", 1.0,
                "clip at 1.0 (the guide's 'NaN values' sign of a too-high rate; a common LoRA default)")

    # --- memory, params, data summary -------------------------------------------------------
    estimate = memory.estimate(shape, final, vram)
    trainable = memory.trainable_params(shape, r, targets)
    if trainable == 0:
        warnings.append(f"target modules {', '.join(targets)} match nothing in the assumed "
                        f"{shape.model_type} shape: trainable params unknown")
    stats = None
    if lengths is not None:
        truncated = sum(1 for n in lengths if n > max_length)
        stats = DataStats(
            path=str(req.data), samples=len(lengths),
            length_unit="tokens" if tokenizer else "estimated-tokens",
            tokenizer=str(tokenizer) if tokenizer else None,
            chars_per_token=None if tokenizer else data_stats.CHARS_PER_TOKEN,
            p50=data_stats.percentile(lengths, 50), p95=data_stats.percentile(lengths, 95),
            max=max(lengths), truncated_at_max_length=truncated,
        )
        if truncated:
            warnings.append(f"max_length {max_length} truncates {truncated} of {len(lengths)} samples "
                            f"(longest: {max(lengths)} tokens)")

    return Advice(
        request=req,
        model=shape,
        lora=LoraAdvice(r=r, alpha=alpha, dropout=dropout, target_modules=targets,
                        target_preset=preset, scaling=scaling),
        training=TrainingAdvice(
            epochs=epochs, per_device_batch_size=batch, gradient_accumulation_steps=accum,
            effective_batch_size=effective, gpus=req.gpus, learning_rate=lr, lr_schedule=schedule,
            warmup_steps=warmup, max_length=max_length, precision=precision, quantization=quant,
            gradient_checkpointing=remat, total_steps=total_steps,
        ),
        memory=estimate,
        trainable_params=trainable,
        data=stats,
        reasons=tuple(reasons),
        warnings=tuple(warnings),
    )
