"""The run config: built once from the advice (the one source of defaults), frozen, flags on top."""

from __future__ import annotations

import json

import pytest

from advisor import advise
from flax_lora.errors import UserError
from flax_lora.training.config import (RESUMABLE, RunConfig, advice_for, advice_values, config_for_resume,
                                       config_from_advice)


def _data(tmp_path, n=40):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i} " * 20, "completion": f"a{i}"}) + "\n" for i in range(n)))
    return path


def test_advised_gradient_checkpointing_reaches_the_run_config(tmp_path):
    from advisor import advise
    from flax_lora.training.config import config_from_advice

    tight = advise(samples=3000, vram_gb=2, model="llama-3.2-1b")
    assert tight.training.gradient_checkpointing
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    cfg = config_from_advice(tight, model="some/llama", data=str(data), output=str(tmp_path / "r"), overrides={})
    assert cfg.remat is True and cfg.quantization == "nf4"
    roomy = advise(samples=3000, vram_gb=24, model="llama-3.2-1b")
    cfg = config_from_advice(roomy, model="some/llama", data=str(data), output=str(tmp_path / "r"), overrides={})
    assert cfg.remat is False
    cfg = config_from_advice(roomy, model="some/llama", data=str(data), output=str(tmp_path / "r"),
                             overrides={"remat": True})
    assert cfg.remat is True  # the flag wins


def test_advised_shard_frozen_reaches_the_run_config_and_the_flag_wins(tmp_path):
    from advisor import advise
    from flax_lora.training.config import config_from_advice

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    big = advise(samples=3000, vram_gb=80, model="meta-llama/Llama-3.1-70B", gpus=8)
    assert big.training.shard_frozen
    make = lambda advice, **over: config_from_advice(advice, model="some/llama", data=str(data),  # noqa: E731
                                                     output=str(tmp_path / "r"), overrides=over)
    assert make(big).shard_frozen is True
    assert make(big, shard_frozen=None).shard_frozen is True  # the flag not given: the advice's
    assert make(advise(samples=3000, vram_gb=24, model="llama-3.2-1b", gpus=8)).shard_frozen is False


def test_every_hyperparameter_comes_from_the_advice(tmp_path):
    """No second table of defaults: without flags the config holds exactly the advisor's choices."""
    data = _data(tmp_path)
    advice = advise(data=str(data), vram_gb=16, model="gpt2", task="summarization", recipe="quick")
    cfg = config_from_advice(advice, model="gpt2", data=str(data), output=str(tmp_path / "r"), overrides={})
    values = advice_values(advice)
    assert {k: getattr(cfg, k) for k in values if k != "precision"} == {k: v for k, v in values.items() if k != "precision"}
    assert cfg.precision == "fp32"  # on a CPU the trainer computes in fp32 unless --precision is given
    required = {n for n, f in RunConfig.model_fields.items() if f.is_required()}
    assert set(values) <= required, "an advice-derived field has a default of its own"


def test_advice_for_asks_the_advisor_with_the_data_file(tmp_path):
    data = _data(tmp_path, 300)
    advice, note = advice_for("gpt2", str(data))
    assert note is None and advice.data.samples == 300 and advice.model.name == "gpt2"
    assert advice == advise(data=str(data), vram_gb=advice.request.vram_gb, model="gpt2")


def test_a_model_the_advisor_cannot_find_offline_gets_the_reference_advice_and_a_note(tmp_path):
    data = _data(tmp_path)
    advice, note = advice_for("some-org/unknown-model-xyz", str(data))
    assert advice.model.source == "reference" and advice.lora.target_preset == "attention"
    assert "no offline shape for some-org/unknown-model-xyz" in note and "preset 'attention'" in note


def test_data_errors_are_the_users_to_fix(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"colour": "red"}\n')
    with pytest.raises(UserError, match="no recognisable fields"):
        advice_for("gpt2", str(bad))
    with pytest.raises(UserError, match="both --model and --data"):
        advice_for("gpt2", None)


def test_the_demo_asks_the_advisor_for_its_own_shape():
    from flax_lora import demo

    advice, note = advice_for(None, None)
    assert note is None and advice.model.model_type == "gpt2" and advice.lora.target_modules == ("c_attn", "attn.c_proj")
    assert advice.training.max_length == demo.SETTINGS["max_length"]
    cfg = config_from_advice(advice, model=None, data=None, output="r", overrides={"max_steps": 7})
    assert cfg.demo and cfg.max_steps == 7 and cfg.log_every == demo.SETTINGS["log_every"]


def test_config_is_frozen_and_replace_validates(tmp_path):
    data = _data(tmp_path)
    cfg = config_from_advice(advise(data=str(data), vram_gb=16), model="gpt2", data=str(data), output="r", overrides={})
    with pytest.raises(Exception):
        cfg.learning_rate = 1.0
    halved = cfg.replace(learning_rate=cfg.learning_rate / 2)
    assert halved.learning_rate == cfg.learning_rate / 2 and cfg.learning_rate == advise(
        data=str(data), vram_gb=16).training.learning_rate
    with pytest.raises(UserError, match="precision"):
        cfg.replace(precision="fp8")
    with pytest.raises(UserError, match="on_bad_row"):
        config_from_advice(advise(data=str(data), vram_gb=16), model="gpt2", data=str(data), output="r",
                           overrides={"on_bad_row": "ignore"})
    assert RunConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


def test_resume_may_change_only_the_resumable_fields(tmp_path):
    data = _data(tmp_path)
    cfg = config_from_advice(advise(data=str(data), vram_gb=16), model="gpt2", data=str(data), output="r", overrides={})
    more = config_for_resume(cfg, "r", {"max_steps": 99, "learning_rate": 1e-4, "seed": None})
    assert (more.max_steps, more.learning_rate) == (99, 1e-4) and more.identity() == cfg.identity()
    with pytest.raises(UserError, match="holds a different run \\(r was"):
        config_for_resume(cfg, "r", {"r": cfg.r * 2})
    assert "learning_rate" in RESUMABLE and "r" not in RESUMABLE


def test_a_cpu_run_picks_bf16_only_where_the_cpu_has_bf16_dots(tmp_path, monkeypatch):
    from flax_lora.training.config import cpu_flags, cpu_precision

    monkeypatch.delenv("LORA_CPU_PRECISION", raising=False)
    assert cpu_precision({"avx2", "avx512f", "avx512_bf16"})[0] == "bf16"
    assert cpu_precision({"amx_bf16"})[0] == "bf16"
    precision, why = cpu_precision({"avx2", "fma"})
    assert precision == "fp32" and "no bf16 dot instructions" in why
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == set()
    monkeypatch.setenv("LORA_CPU_PRECISION", "bf16")
    assert cpu_precision({"avx2"})[0] == "bf16"


def test_the_cpu_precision_reaches_the_config_and_is_said_once(tmp_path, monkeypatch):
    from flax_lora.training.config import precision_note

    data = _data(tmp_path)
    advice = advise(data=str(data), vram_gb=16, model="gpt2")
    monkeypatch.setenv("LORA_CPU_PRECISION", "bf16")
    cfg = config_from_advice(advice, model="gpt2", data=str(data), output=str(tmp_path / "r"), overrides={})
    assert cfg.precision == "bf16" and "LORA_CPU_PRECISION" in precision_note(cfg, {})
    given = {"precision": "fp32"}
    cfg = config_from_advice(advice, model="gpt2", data=str(data), output=str(tmp_path / "r"), overrides=given)
    assert cfg.precision == "fp32" and precision_note(cfg, given) is None
    demo = config_from_advice(advice, model=None, data=None, output=str(tmp_path / "d"), overrides={})
    assert demo.precision == "fp32" and precision_note(demo, {}) is None
