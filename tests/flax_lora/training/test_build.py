"""Building a run from its config: with or without an advice file, the adapter targets are the
modules the advisor names; data errors surface before the model loads."""

from __future__ import annotations

import json

import pytest

from advisor import advise
from flax_lora.errors import UserError
from flax_lora.lora import select_targets
from flax_lora.training.build import build
from flax_lora.training.config import advice_for, config_from_advice
from flax_lora.training.rundir import RunDir


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig

    from flax_lora import demo
    from flax_lora.models import hub
    from flax_lora.models.decoder import causal_lm_from_config

    d = tmp_path_factory.mktemp("llama")
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=32, max_position_embeddings=64, bos_token_id=1,
                      eos_token_id=1, pad_token_id=0)
    hub.save_pt_safetensors(d / "model", causal_lm_from_config(cfg, seed=0).params, cfg)
    demo.save_tokenizer(demo.build_tokenizer(), d / "model")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo.make_rows(40, 0)))
    return d


def test_with_and_without_an_advice_file_the_same_targets_the_advisor_names(llama_dir, tmp_path):
    model, data = str(llama_dir / "model"), str(llama_dir / "train.jsonl")
    from_file = advise(model=model, data=data, vram_gb=16)  # what `lora advise ... -o a.json` writes
    asked, note = advice_for(model, data)  # what `lora train` asks when given no advice file
    assert note is None
    targets = []
    for advice in (from_file, asked):
        cfg = config_from_advice(advice, model=model, data=data, output=str(tmp_path / "r"), overrides={})
        s = build(cfg, RunDir(tmp_path / "r"))
        assert set(s.targets) == set(select_targets(s.linears, list(advice.lora.target_modules)))
        targets.append(sorted(s.targets))
    assert targets[0] == targets[1] and len(targets[0]) == 2 * 4  # q, k, v, o in 2 layers


def test_a_bad_eval_file_fails_before_the_model_loads(llama_dir, tmp_path, monkeypatch):
    import flax_lora.models as models

    model, data = str(llama_dir / "model"), str(llama_dir / "train.jsonl")
    cfg = config_from_advice(advise(model=model, data=data, vram_gb=16), model=model, data=data,
                             output=str(tmp_path / "r"), overrides={"eval_data": str(tmp_path / "missing.jsonl")})
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded before the data check"))
    with pytest.raises(UserError, match="not found"):
        build(cfg, RunDir(tmp_path / "r"))
