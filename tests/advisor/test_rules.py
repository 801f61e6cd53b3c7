"""The advisor's rules and the resolutions of the guide's conflicts (advisor/RESOLUTIONS.md)."""

import math

import pytest

from advisor import Advice, AdviceError, AdviceRequest, advise, memory
from advisor.memory import Setup
from advisor.rules import choose_epochs


def reason(advice, field):
    (r,) = [r for r in advice.reasons if r.field == field]
    return r.why


def test_default_advice_for_3000_samples_12gb():
    a = advise(samples=3000, vram_gb=12)
    assert (a.lora.r, a.lora.alpha, a.lora.scaling, a.lora.dropout) == (8, 16, 2.0, 0.2)
    assert a.lora.target_preset == "attention"
    t = a.training
    assert (t.epochs, t.learning_rate, t.lr_schedule, t.warmup_steps) == (4, 2e-4, "constant", 0)
    assert (t.max_length, t.precision, t.quantization) == (512, "bf16", "none")
    assert t.effective_batch_size == t.per_device_batch_size * t.gradient_accumulation_steps * t.gpus
    assert t.total_steps == math.ceil(3000 / t.effective_batch_size) * t.epochs
    assert a.memory.fits and a.model.source == "reference"
    assert a.model.name in reason(a, "model")
    assert any(a.model.name in s for s in a.memory.assumptions)


def test_every_advised_value_has_a_reason():
    a = advise(samples=3000, vram_gb=12)
    fields = {r.field for r in a.reasons}
    for name in ("r", "alpha", "dropout", "target_modules", "scaling"):
        assert f"lora.{name}" in fields
    for name in type(a.training).model_fields:
        if name != "gpus":
            assert f"training.{name}" in fields, name


def test_batch_from_vram_table_then_shrunk_to_fit():
    a = advise(samples=3000, vram_gb=12)
    b = a.training.per_device_batch_size
    assert b <= 8  # top of the "12GB: 4-8" row
    setup = Setup(a.lora.r, a.lora.target_modules, b, a.training.max_length)
    assert memory.fits(a.model, setup, 12)
    if b < 8:  # it was shrunk because twice the batch does not fit
        assert not memory.fits(a.model, setup._replace(batch=2 * b), 12)
        assert "halved" in reason(a, "training.per_device_batch_size")
    assert a.training.effective_batch_size >= 16  # accumulation restores the guide's 4 x 4


def test_small_gpu_long_sequence_shrinks_batch_and_accumulates():
    a = advise(samples=20000, vram_gb=16, model="gpt2-xl", max_length=1024)
    t = a.training
    assert t.per_device_batch_size < 8
    assert t.gradient_accumulation_steps == math.ceil(16 / t.per_device_batch_size)


def test_gpus_count_in_effective_batch():
    a = advise(samples=3000, vram_gb=24, model="gpt2", gpus=4)
    t = a.training
    assert t.effective_batch_size == t.per_device_batch_size * t.gradient_accumulation_steps * 4


@pytest.mark.parametrize("samples,epochs", [(50, 10), (100, 10), (999, 5), (1000, 7), (3000, 4),
                                            (4999, 3), (5000, 5), (10000, 4), (50000, 3),
                                            (50001, 3), (500000, 1)])
def test_epochs_interpolate_on_log_samples(samples, epochs):
    assert choose_epochs(samples)[0] == epochs


def test_epochs_never_increase_within_a_row():
    values = [choose_epochs(n)[0] for n in range(1000, 5000, 37)]
    assert values == sorted(values, reverse=True)


def test_recipe_keeps_its_alpha_unless_a_style_is_given():
    quick = advise(samples=1000, vram_gb=12, recipe="quick")
    assert (quick.lora.r, quick.lora.alpha) == (4, 16)
    assert "recipe" in reason(quick, "lora.alpha")
    assert advise(samples=1000, vram_gb=12, recipe="quick", style="standard").lora.alpha == 8
    assert advise(samples=1000, vram_gb=12, recipe="quick", r=8).lora.alpha == 32  # keeps 4 x r
    assert advise(samples=1000, vram_gb=12).lora.alpha == 2 * 8  # no recipe: standard


@pytest.mark.parametrize("style,k", [("conservative", 1), ("standard", 2), ("aggressive", 4)])
def test_styles(style, k):
    a = advise(samples=3000, vram_gb=12, task="reasoning", style=style)
    assert a.lora.alpha == k * 16 and a.lora.scaling == k


def test_recipes_apply_and_flags_override():
    a = advise(samples=50000, vram_gb=80, recipe="max-quality", model="gpt2")
    assert (a.lora.r, a.lora.alpha, a.lora.dropout, a.training.epochs) == (16, 64, 0.1, 3)
    assert (a.training.max_length, a.training.learning_rate, a.training.per_device_batch_size) == (1024, 1e-4, 8)
    b = advise(samples=50000, vram_gb=80, recipe="max-quality", model="gpt2", r=32, epochs=2,
               learning_rate=3e-4, batch_size=4, max_length=256, dropout=0.0)
    assert (b.lora.r, b.training.epochs, b.training.learning_rate) == (32, 2, 3e-4)
    assert (b.training.per_device_batch_size, b.training.max_length, b.lora.dropout) == (4, 256, 0.0)
    assert reason(b, "lora.r") == "given"


def test_noisy_data_means_heavy_dropout_even_with_recipe():
    assert advise(samples=100000, vram_gb=24, noisy=True).lora.dropout == 0.2
    assert advise(samples=100000, vram_gb=24, noisy=True, recipe="balanced").lora.dropout == 0.2
    assert advise(samples=100000, vram_gb=24).lora.dropout == 0.05
    assert advise(samples=20000, vram_gb=24).lora.dropout == 0.1


@pytest.mark.parametrize("task,r", [("classification", 4), ("summarization", 8), ("reasoning", 16), ("legal", 32)])
def test_rank_by_task(task, r):
    assert advise(samples=3000, vram_gb=24, task=task).lora.r == r


def test_learning_rate_rules():
    assert advise(samples=3000, vram_gb=80, model="mistral-7b").training.learning_rate == 1e-4
    assert advise(samples=3000, vram_gb=80, model="llama-2-7b").training.learning_rate == 1e-4
    assert advise(samples=3000, vram_gb=12, model="gpt2").training.learning_rate == 2e-4


@pytest.mark.parametrize("cls,length", [("short", 128), ("medium", 512), ("long", 1024), ("very-long", 2048)])
def test_text_length_classes(cls, length):
    assert advise(samples=3000, vram_gb=80, model="llama-3.2-1b", text_length=cls).training.max_length == length


def test_max_length_capped_by_model_positions():
    a = advise(samples=3000, vram_gb=80, model="gpt2", text_length="very-long")
    assert a.training.max_length == 1024 and "capped" in reason(a, "training.max_length")
    b = advise(samples=3000, vram_gb=80, model="gpt2", max_length=4096)
    assert b.training.max_length == 1024 and any("capped" in w for w in b.warnings)


def test_int8_when_batch_one_does_not_fit():
    # 14 GB: bf16 weights alone are 13.5 GiB; int8 at batch 1 x 512 needs ~12.7 GiB (attention
    # scores counted in fp32 + bf16 since the estimator was checked against the compiled step)
    a = advise(samples=3000, vram_gb=14, model="mistral-7b")
    assert a.training.quantization == "int8" and a.memory.fits
    bf16_b1 = Setup(a.lora.r, a.lora.target_modules, 1, a.training.max_length)
    assert not memory.fits(a.model, bf16_b1, 14)
    assert "int8" in a.warnings[0]
    assert advise(samples=3000, vram_gb=80, model="mistral-7b").training.quantization == "none"


def test_remedies_in_order_with_their_savings():
    a = advise(samples=3000, vram_gb=6, model="llama-3.1-8b", max_length=2048, quantization="none", r=16)
    assert not a.memory.fits
    (w,) = [w for w in a.warnings if "even at batch 1" in w]
    assert w.index("int8") < w.index("max_length") < w.index("r 16 -> 8")
    shape, targets = a.model, a.lora.target_modules
    gb = lambda s: sum(memory.breakdown(shape, s).values()) / memory.GIB  # noqa: E731
    assert a.training.gradient_checkpointing  # turned on first: batch 1 does not fit without it
    base = Setup(16, targets, 1, 2048, remat=True)
    assert f"int8 quantization saves {gb(base) - gb(base._replace(quantization='int8')):.2f} GB" in w
    assert f"r 16 -> 8 saves {gb(base) - gb(base._replace(r=8)):.2f} GB" in w


def test_schedule_and_warmup():
    a = advise(samples=3000, vram_gb=24, lr_schedule="cosine")
    assert a.training.warmup_steps == math.ceil(0.05 * a.training.total_steps) > 0
    assert advise(samples=3000, vram_gb=24, lr_schedule="linear", warmup_steps=7).training.warmup_steps == 7


@pytest.mark.parametrize("model,names", [
    ("gpt2", ("c_attn", "attn.c_proj")),
    ("bigscience/bloom-560m", ("query_key_value", "dense")),
    ("facebook/opt-350m", ("q_proj", "k_proj", "v_proj", "out_proj")),
    ("EleutherAI/gpt-j-6B", ("q_proj", "k_proj", "v_proj", "out_proj")),
])
def test_default_targets_are_concrete_names(model, names):
    a = advise(samples=3000, vram_gb=80, model=model)
    assert a.lora.target_modules == names and a.lora.target_preset == "attention"
    assert a.trainable_params == memory.trainable_params(a.model, a.lora.r, names)


def test_explicit_targets_checked_against_the_architecture():
    a = advise(samples=3000, vram_gb=24, model="gpt2", target_modules=("c_fc",))
    assert a.lora.target_modules == ("c_fc",) and a.lora.target_preset is None
    assert a.trainable_params == 12 * 8 * (768 + 3072)
    with pytest.raises(AdviceError, match="c_attn"):
        advise(samples=3000, vram_gb=24, model="gpt2", target_modules=("q_proj",))
    assert advise(samples=3000, vram_gb=24, model="gpt2", target_modules="attention-mlp").lora.target_modules == (
        "c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")


def test_gpt2_names_match_like_peft():
    """``c_proj`` is GPT-2's attention and MLP output: the bare name adapts both (as PEFT
    does), the ``attention`` preset only the attention one (``attn.c_proj``)."""
    both = advise(samples=3000, vram_gb=24, model="gpt2", target_modules=("c_attn", "c_proj"))
    attn = advise(samples=3000, vram_gb=24, model="gpt2")
    assert both.trainable_params == 12 * 8 * ((768 + 2304) + (768 + 768) + (3072 + 768))
    assert attn.trainable_params == 12 * 8 * ((768 + 2304) + (768 + 768))


def test_size_class_model():
    a = advise(samples=3000, vram_gb=24, model_params="1.3B")
    assert a.model.source == "size-class" and abs(a.model.params / 1.3e9 - 1) < 0.1


def test_json_round_trip():
    a = advise(samples=3000, vram_gb=12, model="gpt2", task="summarization")
    assert Advice.from_json(a.to_json()) == a
    assert a.schema_version == "1" and a.request.task == "summarization"


def test_request_or_keywords():
    req = AdviceRequest(samples=3000, vram_gb=12)
    assert advise(req) == advise(samples=3000, vram_gb=12)
    with pytest.raises(AdviceError):
        advise(req, samples=5)


@pytest.mark.parametrize("fields,needle", [
    ({"samples": -1, "vram_gb": 12}, "samples"),
    ({"samples": 10, "vram_gb": 0}, "vram_gb"),
    ({"samples": 10, "vram_gb": 12, "task": "poetry"}, "task"),
    ({"samples": 10, "vram_gb": 12, "recipe": "fast"}, "recipe"),
    ({"vram_gb": 12}, "samples"),
    ({"samples": 10, "vram_gb": 12, "model_params": "huge"}, "1.3B"),
])
def test_bad_requests_are_advice_errors(fields, needle):
    with pytest.raises(AdviceError, match=needle) as info:
        advise(**fields)
    assert "\n" not in str(info.value)


def test_gradient_checkpointing_only_when_batch_one_does_not_fit():
    a = advise(samples=3000, vram_gb=12)
    assert a.training.gradient_checkpointing is False
    assert reason(a, "training.gradient_checkpointing").startswith("off: batch 1 fits")
    # 2.4 GB: int8, then nf4 (QLoRA), then recomputing activations makes batch 1 fit
    b = advise(samples=3000, vram_gb=2.4, model="llama-3.2-1b")
    assert b.training.quantization == "nf4" and b.training.gradient_checkpointing and b.memory.fits
    no_remat = Setup(b.lora.r, b.lora.target_modules, 1, b.training.max_length, quantization="nf4")
    assert not memory.fits(b.model, no_remat, 2.4) and memory.fits(b.model, no_remat._replace(remat=True), 2.4)
    assert any("advised gradient checkpointing (lora train --remat)" in w for w in b.warnings)
    # the user's choice wins either way
    c = advise(samples=3000, vram_gb=2.4, model="llama-3.2-1b", gradient_checkpointing=False)
    assert c.training.gradient_checkpointing is False and not c.memory.fits
    assert any("gradient checkpointing (--remat) saves" in w for w in c.warnings)  # offered as a remedy
    assert advise(samples=3000, vram_gb=24, gradient_checkpointing=True).training.gradient_checkpointing


def test_gradient_checkpointing_is_not_advised_where_the_trainer_has_none():
    a = advise(samples=3000, vram_gb=1, model="facebook/opt-350m")  # legacy: transformers' Flax class
    assert a.training.gradient_checkpointing is False
    assert "not available for model type opt" in reason(a, "training.gradient_checkpointing")
    b = advise(samples=3000, vram_gb=24, model="facebook/opt-125m", gradient_checkpointing=True)
    assert b.training.gradient_checkpointing is False and "asked for, but not available" in reason(
        b, "training.gradient_checkpointing")


def test_several_gpus_offer_sharded_frozen_weights_when_nothing_fits():
    a = advise(samples=3000, vram_gb=4, model="llama-3.1-8b", gpus=4, shard_frozen=False)
    assert a.training.shard_frozen is False and reason(a, "training.shard_frozen") == "given"
    (w,) = [w for w in a.warnings if w.startswith("does not fit even at batch 1")]
    t = a.training
    base = Setup(a.lora.r, a.lora.target_modules, 1, t.max_length, quantization=t.quantization, remat=True, gpus=4)
    saves = (sum(memory.breakdown(a.model, base).values())
             - sum(memory.breakdown(a.model, base._replace(shard_frozen=True)).values())) / memory.GIB
    assert f"--shard-frozen over the 4 GPUs saves {saves:.2f} GB per GPU" in w


def test_a_70b_on_8_x_80gb_is_split_not_quantized():
    """The first rung: a full bf16 copy (131 GB) fits no 80 GB GPU; split over 8 it does, so no
    quantization is advised, and the estimate holds an eighth of the weights plus one layer."""
    a = advise(samples=10000, vram_gb=80, model="meta-llama/Llama-3.1-70B", gpus=8, max_length=2048)
    t, m = a.training, a.memory
    assert t.shard_frozen is True and t.quantization == "none" and t.precision == "bf16" and m.fits
    full = memory.frozen_weight_bytes(a.model, "bf16", "none")
    assert m.breakdown_gb["frozen_weights"] == pytest.approx(full / 8 / memory.GIB, abs=1e-3)
    layer = memory.layer_frozen_bytes(a.model, "bf16", "none")
    assert m.breakdown_gb["frozen_gathered"] == pytest.approx(layer / memory.GIB, abs=1e-3)
    assert layer == 2 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672)  # q, o, k, v, gate/up/down
    why = reason(a, "training.shard_frozen")
    assert "> 80 GB with a full copy of the frozen weights (131.41 GB)" in why and "each holds 16.43 GB" in why
    assert not [w for w in a.warnings if "does not fit" in w]


def test_shard_frozen_only_where_a_full_copy_does_not_fit():
    one = advise(samples=10000, vram_gb=80, model="meta-llama/Llama-3.1-70B", max_length=2048)
    assert one.training.shard_frozen is False and "one GPU" in reason(one, "training.shard_frozen")
    assert one.training.quantization == "nf4"  # the ladder's next rungs on a single GPU
    small = advise(samples=3000, vram_gb=24, model="llama-3.2-1b", gpus=4)
    assert small.training.shard_frozen is False and reason(small, "training.shard_frozen").startswith("off: batch 1 fits")
    assert "frozen_gathered" not in small.memory.breakdown_gb
    assert advise(samples=3000, vram_gb=24, model="llama-3.2-1b", gpus=4, shard_frozen=True).training.shard_frozen
    refused = advise(samples=10000, vram_gb=80, model="meta-llama/Llama-3.1-70B", gpus=8, shard_frozen=False)
    assert refused.training.quantization != "none"  # without the split it needs quantized weights
