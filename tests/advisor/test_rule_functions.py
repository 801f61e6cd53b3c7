"""Single rules of the advisor's pipeline, called directly on a Context (advisor.rules)."""

import math
from dataclasses import replace

import pytest

from advisor import tables as T
from advisor.rules import (
    PIPELINE,
    Context,
    Decision,
    advise,
    halve_to_fit,
    make_request,
    need_gb,
    rule_alpha,
    rule_batch_size,
    rule_gradient_checkpointing,
    rule_quantization,
    rule_rank,
    run_rules,
)


def context_before(rule, **fields) -> Context:
    """The context the pipeline hands ``rule``: every rule before it applied to the request."""
    ctx, _, _ = run_rules(Context.of(make_request(**fields)), PIPELINE[:PIPELINE.index(rule)])
    return ctx


def with_vram(ctx: Context, vram_gb: float) -> Context:
    return replace(ctx, request=ctx.request.model_copy(update={"vram_gb": vram_gb}))


def test_pipeline_order_is_the_order_of_the_reasons():
    names = [rule.__name__ for rule in PIPELINE]
    assert names == ["rule_model", "rule_data", "rule_rank", "rule_alpha", "rule_dropout", "rule_targets",
                     "rule_max_length", "rule_examples", "rule_precision", "rule_learning_rate", "rule_shard_frozen",
                     "rule_quantization", "rule_gradient_checkpointing", "rule_batch_size", "rule_accumulation",
                     "rule_epochs", "rule_total_steps", "rule_schedule", "rule_warmup", "rule_regularization", "rule_packing", "rule_memory",
                     "rule_data_summary"]
    fields = [r.field for r in advise(make_request(samples=3000, vram_gb=12)).reasons]
    assert fields == ["model", "lora.r", "lora.alpha", "lora.scaling", "lora.dropout", "lora.target_modules",
                      "training.max_length", "training.precision", "training.learning_rate",
                      "training.shard_frozen", "training.quantization", "training.gradient_checkpointing",
                      "training.per_device_batch_size", "training.gradient_accumulation_steps",
                      "training.effective_batch_size", "training.epochs", "training.total_steps",
                      "training.lr_schedule", "training.warmup_steps", "training.weight_decay",
                      "training.max_grad_norm", "training.packing"]


# ----------------------------------------------------------------------------- rank, alpha


@pytest.mark.parametrize("task", sorted(T.RANK_BY_TASK))
def test_rank_by_task(task):
    d = rule_rank(Context.of(make_request(samples=3000, vram_gb=12, task=task)))
    r, line = T.RANK_BY_TASK[task]
    assert d.values == {"r": r} and d.value == r
    assert d.why.startswith(f'"Choosing rank" for task {task!r}: {line}') and T.RANK_TABLE[r][2] in d.why
    assert d.reasons[0].field == "lora.r" and d.reasons[0].value == str(r) and d.warnings == ()


def test_rank_from_recipe_over_task_and_given_over_recipe():
    recipe = rule_rank(Context.of(make_request(samples=3000, vram_gb=12, task="legal", recipe="quick")))
    assert (recipe.value, recipe.why) == (4, "recipe 'quick': r = 4")
    given = rule_rank(Context.of(make_request(samples=3000, vram_gb=12, task="legal", recipe="quick", r=64)))
    assert (given.value, given.why) == (64, "given")


def test_alpha_rule_decides_alpha_and_scaling_with_a_reason_each():
    ctx = context_before(rule_alpha, samples=3000, vram_gb=12, task="reasoning", style="aggressive")
    d = rule_alpha(ctx)
    assert d.values == {"alpha": 64.0, "scaling": 4.0}
    assert [(r.field, r.value) for r in d.reasons] == [("lora.alpha", "64"), ("lora.scaling", "4")]
    assert d.reasons[1].why == '"Formula": scaling = alpha / r = 64 / 16'


# ----------------------------------------------------------------------------- the memory ladder


def test_quantization_then_gradient_checkpointing_ladder():
    """A 1B Llama on ever smaller GPUs: int8 first (the guide's lever), nf4 only when int8 does not
    fit batch 1 (QLoRA, not in the guide), then recomputing activations, judged with nf4 weights."""
    ctx = context_before(rule_quantization, samples=3000, vram_gb=3.5, model="llama-3.2-1b")
    assert ctx.remat is False and need_gb(ctx, 1, "none") > 3.5 >= need_gb(ctx, 1, "int8")
    q = rule_quantization(ctx)
    assert q.value == "int8" and q.why.startswith("batch 1 needs") and "load_in_8bit" in q.why
    (warning,) = q.warnings
    assert warning.startswith("the model does not fit in bf16 even at batch 1") and "advised int8" in warning

    ctx = context_before(rule_quantization, samples=3000, vram_gb=2.4, model="llama-3.2-1b")
    assert need_gb(ctx, 1, "int8") > 2.4
    q = rule_quantization(ctx)
    assert q.value == "nf4" and "not in the guide: QLoRA" in q.why and "advised nf4" in q.warnings[0]
    ctx = replace(ctx, **q.values)
    assert need_gb(ctx, 1) > 2.4 >= need_gb(ctx, 1, remat=True)
    g = rule_gradient_checkpointing(ctx)
    assert g.value is True and "with nf4 weights" in g.why
    assert g.warnings == (f"advised gradient checkpointing (lora train --remat): {g.why}",)


def test_ladder_stops_where_the_model_fits_and_respects_the_users_choice():
    ctx = context_before(rule_quantization, samples=3000, vram_gb=80, model="llama-3.2-1b")
    q = rule_quantization(ctx)
    assert (q.value, q.why, q.warnings) == ("none", '"Model Quantization": off while the model fits', ())
    given = context_before(rule_quantization, samples=3000, vram_gb=3, model="llama-3.2-1b", quantization="none")
    assert (rule_quantization(given).value, rule_quantization(given).why) == ("none", "given")
    refused = context_before(rule_gradient_checkpointing, samples=3000, vram_gb=3, model="llama-3.2-1b",
                             gradient_checkpointing=False)
    g = rule_gradient_checkpointing(refused)
    assert (g.value, g.why, g.warnings) == (False, "given", ())


def test_no_gradient_checkpointing_for_models_outside_the_port():
    ctx = context_before(rule_gradient_checkpointing, samples=3000, vram_gb=1, model="facebook/opt-350m")
    assert ctx.quantization == "nf4" and need_gb(ctx, 1) > 1
    g = rule_gradient_checkpointing(ctx)
    assert g.value is False and g.why.startswith("off: not available for model type opt")


# ----------------------------------------------------------------------------- batch size


def test_batch_is_halved_until_it_fits():
    ctx = context_before(rule_batch_size, samples=3000, vram_gb=80, model="gpt2-xl", max_length=1024)
    assert ctx.recipe is None and ctx.request.vram_gb == 80
    # a GPU that holds batch 2 but not batch 4: the table's ceiling for it is tried, then halved
    tight = with_vram(ctx, (need_gb(ctx, 2) + need_gb(ctx, 4)) / 2)
    vram = tight.request.vram_gb
    d = rule_batch_size(tight)
    ceiling = [row for row in T.BATCH_BY_VRAM if row.vram_gb <= vram][-1].max_batch[1]
    assert d.value == 2 and ceiling > 2
    assert need_gb(tight, 2) <= vram < need_gb(tight, 4)
    assert d.why.endswith(f"> {vram:g} GB, halved to the largest that fits: 2")
    assert f"batch {ceiling} needs {need_gb(tight, ceiling):.2f} GB at max_length 1024" in d.why


def test_batch_confirmed_when_the_ceiling_fits_and_capped_by_samples():
    ctx = context_before(rule_batch_size, samples=3000, vram_gb=80, model="gpt2")
    d = rule_batch_size(ctx)
    assert d.value == 16 and d.why.endswith("; the memory model confirms 16 fits")
    few = context_before(rule_batch_size, samples=6, vram_gb=80, model="gpt2", gpus=2)
    d = rule_batch_size(few)
    assert d.value == 3 and "; capped at 3 by 6 samples over 2 GPU(s)" in d.why


def test_halve_to_fit_tries_integer_halves_and_falls_back_to_one():
    ctx = context_before(rule_batch_size, samples=3000, vram_gb=80, model="gpt2-large", max_length=1024)
    assert halve_to_fit(with_vram(ctx, (need_gb(ctx, 3) + need_gb(ctx, 6)) / 2), 12) == 3  # 12, 6, 3
    assert halve_to_fit(with_vram(ctx, need_gb(ctx, 1) / 2), 8) == 1  # nothing fits


def test_a_given_batch_that_does_not_fit_names_the_largest_that_does():
    ctx = context_before(rule_batch_size, samples=3000, vram_gb=80, model="gpt2-large", max_length=1024,
                         batch_size=8)
    tight = with_vram(ctx, (need_gb(ctx, 5) + need_gb(ctx, 6)) / 2)
    d = rule_batch_size(tight)
    assert (d.value, d.why) == (8, "given")
    assert d.warnings == (f"batch 8 needs {need_gb(tight, 8):.2f} GB > {tight.request.vram_gb:g} GB; "
                          "batch 5 would fit",)


# ----------------------------------------------------------------------------- the whole pipeline


def test_advise_is_the_pipeline_folded_over_the_context():
    req = make_request(samples=3000, vram_gb=12, recipe="balanced")
    ctx, reasons, warnings = run_rules(Context.of(req))
    a = advise(req)
    assert (ctx.r, ctx.alpha, ctx.batch, ctx.epochs) == (a.lora.r, a.lora.alpha, a.training.per_device_batch_size,
                                                         a.training.epochs)
    assert tuple(reasons) == a.reasons and tuple(warnings) == a.warnings
    assert a.training.total_steps == math.ceil(3000 / ctx.effective) * ctx.epochs


def test_decision_value_needs_exactly_one():
    with pytest.raises(ValueError):
        Decision({"a": 1, "b": 2}).value  # noqa: B018
