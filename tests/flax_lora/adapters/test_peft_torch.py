"""Round trip through PyTorch: our PEFT and merged exports loaded by peft / transformers (torch).

Skipped without torch and peft; CI installs both.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from cli.main import cli  # noqa: E402
from flax_lora.lora import LoraConfig  # noqa: E402
from tests.flax_lora.adapters.helpers import GPT2, IDS, LLAMA, flax_gpt2, flax_llama, random_adapter, save_run  # noqa: E402

pytestmark = pytest.mark.torch
TOL = 1e-4

CASES = {
    # GPT-2: Conv1D (fan_in_fan_out), attention and MLP c_proj both, rsLoRA.
    "gpt2": (GPT2, flax_gpt2, ["c_attn", "c_proj", "c_fc"], LoraConfig(r=4, alpha=8, use_rslora=True)),
    # Llama 3 style (GQA, head_dim, rope_theta), every projection + lm_head, selected by a regex.
    "llama": (LLAMA, flax_llama, r"(.*/)?(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|lm_head)",
              LoraConfig(r=4, alpha=16)),
}


def _torch_logits(model) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    cfg, load, targets, lcfg = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    config = AutoConfig.for_model(**cfg)
    base = tmp / "base"
    AutoModelForCausalLM.from_config(config, attn_implementation="eager").save_pretrained(base)
    model = load(base)
    lora, chosen = random_adapter(model, targets)
    run = save_run(tmp / "run", model, lora, chosen, lcfg, targets, base, cfg["model_type"])
    want = model.logits(lora, lcfg.scaling)
    # JAX base must already agree with torch, or the adapter comparison means nothing
    base_torch = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    assert np.abs(model.logits() - _torch_logits(base_torch)).max() < TOL
    assert np.abs(want - model.logits()).max() > 1e-2  # the adapter does something
    return request.param, tmp, base, run, want, chosen, lcfg


def test_peft_from_pretrained_matches_jax(case):
    name, tmp, base, run, want, chosen, lcfg = case
    out = tmp / "peft"
    res = CliRunner().invoke(cli, ["export", str(run), "--format", "peft", "--out", str(out)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is (name == "gpt2")
    assert cfg["r"] == lcfg.r and cfg["lora_alpha"] == lcfg.alpha and cfg["use_rslora"] is lcfg.use_rslora
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager"), out)
    adapted = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert adapted == {p.replace("/", ".") for p in chosen}  # target_modules selects exactly our modules
    diff = np.abs(_torch_logits(pm) - want).max()
    print(f"{name}: PEFT vs JAX+adapter max abs logit diff {diff:.2e}")
    assert diff < TOL


def test_merged_loads_in_transformers_and_here(case):
    name, tmp, base, run, want, chosen, lcfg = case
    out = tmp / "merged"
    res = CliRunner().invoke(cli, ["export", str(run), "--format", "merged", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "numpy" not in (out / "config.json").read_text()
    merged = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    diff = np.abs(_torch_logits(merged) - want).max()
    print(f"{name}: merged (torch) vs JAX+adapter max abs logit diff {diff:.2e}")
    assert diff < TOL
    ours = (flax_gpt2 if name == "gpt2" else flax_llama)(out)
    assert np.abs(ours.logits() - want).max() < TOL


@pytest.mark.parametrize("model_type,extra", [
    pytest.param("opt", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                             word_embed_proj_dim=32), marks=pytest.mark.legacy),
    pytest.param("gpt_neo", dict(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]]),
                 marks=pytest.mark.legacy),
    ("qwen2", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    ("mistral", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
])
def test_flax_linear_paths_are_torch_module_paths(model_type, extra):
    """The '/' -> '.' rename names a torch nn.Linear with the same in/out for every Flax linear."""
    import jax.numpy as jnp

    from flax_lora.lora import discover_linears
    from flax_lora.models.base import param_shapes
    from flax_lora.models.decoder import DecoderLM

    config = AutoConfig.for_model(model_type, vocab_size=128, max_position_embeddings=64, **extra)
    ids = jnp.asarray(IDS)
    if model_type in ("qwen2", "mistral"):
        module, params = DecoderLM(config), param_shapes(DecoderLM(config))
        linears = discover_linears(lambda p: module.apply({"params": p}, ids), params)
    else:
        from transformers import FlaxAutoModelForCausalLM

        fm = FlaxAutoModelForCausalLM.from_config(config, _do_init=False)
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape)
        linears = discover_linears(lambda p: fm.module.apply({"params": p}, ids, jnp.ones_like(ids), pos), fm.params_shape_tree)
    tm = dict(AutoModelForCausalLM.from_config(config).named_modules())
    assert linears
    for path, info in linears.items():
        mod = tm.get(path.replace("/", "."))
        assert isinstance(mod, torch.nn.Linear), path
        assert (mod.in_features, mod.out_features) == (info.in_features, info.out_features), path
