"""PEFT / merged export and PEFT import without torch: layouts, round trips, bad input."""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner
from tests.flax_lora.adapters.helpers import GPT2, LLAMA, flax_gpt2, flax_llama, random_adapter, random_params, save_run
from safetensors.numpy import load_file
from transformers import AutoConfig

from cli.main import cli
from flax_lora.errors import UserError
from flax_lora.adapters.merged import export_merged
from flax_lora.adapters.peft import export_peft, load_peft_adapter, peft_target_modules
from flax_lora.lora import LoraConfig
from flax_lora.models.weights import flax_to_torch, read_checkpoint, write_checkpoint


def _save_base(folder, cfg, dtype=None, numpy_dtype_defect=False):
    """Random-init base model written as a PyTorch-layout checkpoint (no torch)."""
    config = AutoConfig.for_model(**cfg)
    from flax_lora.models.base import param_shapes
    from flax_lora.models.decoder import DecoderLM
    from flax_lora.models.gpt2 import GPT2LM

    shapes = param_shapes((GPT2LM if cfg["model_type"] == "gpt2" else DecoderLM)(config))
    params = random_params(shapes)
    write_checkpoint(folder, flax_to_torch(params, dtype=dtype))
    config.to_json_file(folder / "config.json")
    if numpy_dtype_defect:  # what transformers' Flax save_pretrained writes for a jnp dtype
        raw = json.loads((folder / "config.json").read_text())
        raw["dtype"] = "numpy"
        (folder / "config.json").write_text(json.dumps(raw))
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama")
    base = _save_base(tmp / "base", LLAMA, numpy_dtype_defect=True)
    model = flax_llama(base)
    lcfg = LoraConfig(r=4, alpha=8)
    lora, chosen = random_adapter(model, ["q_proj", "v_proj", "down_proj"])
    run = save_run(tmp / "run", model, lora, chosen, lcfg, ["q_proj", "v_proj", "down_proj"], base, "llama")
    return tmp, base, run, model, lora, chosen, lcfg


def test_peft_layout(llama):
    tmp, base, run, model, lora, chosen, lcfg = llama
    out = export_peft(run / "adapter", tmp / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"] and cfg["fan_in_fan_out"] is False
    assert (cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == (4, 8, str(base))
    t = load_file(str(out / "adapter_model.safetensors"))
    assert len(t) == 2 * len(chosen) == 2 * 2 * 3
    a = t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = t["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, 32) and b.shape == (64, 4)  # [r, in], [out, r]: q is 4 heads x head_dim 16
    np.testing.assert_array_equal(a, np.asarray(lora["model"]["layers"]["1"]["self_attn"]["q_proj"]["a"]).T)


def test_peft_import_round_trip_and_mismatch(llama, tmp_path):
    tmp, base, run, model, lora, chosen, lcfg = llama
    out = export_peft(run / "adapter", tmp_path / "peft")
    back, cfg = load_peft_adapter(out, model.linears)
    assert cfg == lcfg
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(lora)):
        np.testing.assert_array_equal(x, y)
    # another base: GPT-2 has no model.layers.*.q_proj
    gpt2 = flax_gpt2(_save_base(tmp_path / "gpt2", GPT2))
    with pytest.raises(UserError, match=r"adapter module model\.layers\.0\.mlp\.down_proj does not exist"):
        load_peft_adapter(out, gpt2.linears)
    # same names, other sizes
    wider = dict(model.linears)
    info = wider["model/layers/0/mlp/down_proj"]
    wider["model/layers/0/mlp/down_proj"] = type(info)(info.path, info.kind, 2 * info.in_features, info.out_features)
    with pytest.raises(UserError, match=r"down_proj\.lora_A\.weight has shape \(4, 48\), this model needs \(4, 96\)"):
        load_peft_adapter(out, wider)


def test_peft_import_rejects_unsupported(llama, tmp_path):
    tmp, base, run, model, *_ = llama
    out = export_peft(run / "adapter", tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        load_peft_adapter(out, model.linears)


def test_merged_folds_adapter_and_fixes_config(llama):
    tmp, base, run, model, lora, chosen, lcfg = llama
    out = export_merged(run / "adapter", tmp / "merged")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "float32"  # base config said "numpy"
    assert (out / "tokenizer_config.json").is_file()
    merged = flax_llama(out)
    assert np.abs(merged.logits() - model.logits(lora, lcfg.scaling)).max() < 1e-5
    assert np.abs(merged.logits() - model.logits()).max() > 1e-2


def test_merged_keeps_bf16_and_shards(tmp_path):
    base = _save_base(tmp_path / "base", LLAMA, dtype=ml_dtypes.bfloat16)
    write_checkpoint(base, read_checkpoint(base), max_shard_bytes=20_000)  # now sharded too
    (base / "model.safetensors").unlink()
    model = flax_llama(base)
    lora, chosen = random_adapter(model, ["o_proj"])
    run = save_run(tmp_path / "run", model, lora, chosen, LoraConfig(4, 4), ["o_proj"], base, "llama")
    out = export_merged(run / "adapter", tmp_path / "merged")
    t = read_checkpoint(out)
    assert {str(v.dtype) for v in t.values()} == {"bfloat16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    w0 = read_checkpoint(base)["model.layers.0.self_attn.o_proj.weight"].astype(np.float32)
    delta = np.asarray(lora["model"]["layers"]["0"]["self_attn"]["o_proj"]["a"] @ lora["model"]["layers"]["0"]["self_attn"]["o_proj"]["b"]).T
    np.testing.assert_allclose(t["model.layers.0.self_attn.o_proj.weight"].astype(np.float32), w0 + delta, atol=0.02)


def test_gpt2_conv1d_export(tmp_path):
    base = _save_base(tmp_path / "base", GPT2)
    model = flax_gpt2(base)
    lora, chosen = random_adapter(model, ["attn.c_proj", "c_attn"])
    lcfg = LoraConfig(4, 8)
    run = save_run(tmp_path / "run", model, lora, chosen, lcfg, ["attn.c_proj", "c_attn"], base, "gpt2")
    out = export_peft(run / "adapter", tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["target_modules"] == ["attn.c_proj", "c_attn"]
    t = load_file(str(out / "adapter_model.safetensors"))
    assert t["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)
    assert t["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 4)
    merged = flax_gpt2(export_merged(run / "adapter", tmp_path / "merged"))
    assert np.abs(merged.logits() - model.logits(lora, lcfg.scaling)).max() < 1e-5


def test_regex_targets_translate_to_dotted_regex():
    adapted = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert peft_target_modules(r"(.*/)?(q_proj|v_proj)", adapted) == r"(.*\.)?(q_proj|v_proj)"
    assert peft_target_modules(r"model/layers/0/.*", adapted) == adapted  # does not cover layer 1: list them


def test_cli_errors_exit_2(llama, tmp_path):
    tmp, base, run, *_ = llama
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no such run or adapter directory" in r.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    r = CliRunner().invoke(cli, ["export", str(run), "--out", str(tmp_path / "full")])
    assert r.exit_code == 2 and "not empty" in r.output
    gpt2 = _save_base(tmp_path / "gpt2", GPT2)
    r = CliRunner().invoke(cli, ["export", str(run), "--format", "merged", "--base", str(gpt2), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "trained on a llama model" in r.output
    r = CliRunner().invoke(cli, ["export", str(run), "--out", str(tmp_path / "p")])
    assert r.exit_code == 0 and "adapter_model.safetensors" in r.output
