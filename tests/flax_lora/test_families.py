"""Every family of the ports (decoder, GPT-2) end to end on a tiny checkpoint saved from PyTorch
transformers (the parity fixtures): lora train, eval, generate, export --format peft|merged; the PEFT
export loads in PEFT and gives our logits, the merged one loads in transformers (4.57 or 5.x, whichever
is installed), and a PEFT adapter made in PyTorch loads here (--adapter) with PyTorch's logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli

pytestmark = pytest.mark.slow
FIXTURES = Path(__file__).parents[1] / "parity" / "fixtures"
FAMILIES = {"qwen3": "qwen3_qknorm_headdim", "gemma": "gemma_mqa_headdim", "gpt2": "gpt2_tied",
            "gemma2": "gemma2_softcap_window",
            "gemma3_text": "gemma3_text_local_global", "phi3": "phi3_longrope_partial",
            "smollm3": "smollm3_nope", "olmo2": "olmo2_post_norms"}
IDS = np.array([[5, 9, 3, 7, 11, 2, 8, 6], [4, 4, 10, 12, 1, 3, 9, 5]])


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """The family's fixture with the demo's word tokenizer (ids < the fixture's vocabulary) and rows."""
    from flax_lora import demo

    d = tmp_path_factory.mktemp(request.param)
    shutil.copytree(FIXTURES / FAMILIES[request.param], d / "model")
    (d / "model" / "golden.npz").unlink()
    demo.save_tokenizer(demo.build_tokenizer(), d / "model")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo.make_rows(48, 0)))
    return request.param, d


def _lora(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def test_train_eval_generate_export(family):
    name, d = family
    run = d / "run"
    _lora("train", "--model", d / "model", "--data", d / "train.jsonl", "--output", run, "--max-steps", 3,
          "--max-length", 16, "-q")
    resolved = json.loads((run / "resolved.json").read_text())
    assert resolved["model_type"] == name and resolved["targets"]
    assert set(json.loads(_lora("eval", run, "--rouge-examples", 2))) >= {"loss", "perplexity", "rougeL"}
    _lora("generate", run, "--prompt", "reverse 1 2 3 4 :", "--max-new-tokens", 4)
    _lora("export", run, "--format", "peft", "--out", d / "peft")
    _lora("export", run, "--format", "merged", "--out", d / "merged")
    config = json.loads((d / "peft" / "adapter_config.json").read_text())
    want = {"phi3": {"qkv_proj", "o_proj"}, "gpt2": {"attn.c_attn", "attn.c_proj"}}  # mlp.c_proj exists too
    assert set(config["target_modules"]) == want.get(name, {"q_proj", "k_proj", "v_proj", "o_proj"})


def _ours(folder, adapter=None):
    """Our logits of a model folder, with a (native or PEFT) adapter folder when given."""
    import jax.numpy as jnp

    from flax_lora.adapters.find import load_any_adapter
    from flax_lora.lora import lora_active
    from flax_lora.models import load_model

    m = load_model(str(folder))
    if adapter is None:
        return np.asarray(m.logits({"params": m.params}, jnp.asarray(IDS), jnp.ones_like(jnp.asarray(IDS))))
    lora, cfg = load_any_adapter(adapter, m.linears(), m.model_type)
    with lora_active(cfg.scaling):
        return np.asarray(m.logits({"params": m.params, "lora": m.stack_lora(lora)}, jnp.asarray(IDS),
                                   jnp.ones_like(jnp.asarray(IDS))))


@pytest.mark.torch
def test_pytorch_loads_our_exports_and_we_load_pytorchs_adapters(family):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    name, d = family
    run = d / "run"
    if not (run / "adapter").exists():
        pytest.skip("needs test_train_eval_generate_export's run")
    torch_ids = torch.tensor(IDS)

    def logits(model):
        with torch.no_grad():
            return model.eval()(torch_ids).logits.float().numpy()

    ours = _ours(d / "model", run / "adapter")
    base = AutoModelForCausalLM.from_pretrained(d / "model", attn_implementation="eager")
    np.testing.assert_allclose(logits(peft.PeftModel.from_pretrained(base, d / "peft")), ours, atol=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(d / "merged", attn_implementation="eager")
    np.testing.assert_allclose(logits(merged), ours, atol=1e-4)
    # an adapter trained in PyTorch (random B so it changes the logits) loads with --adapter
    torch.manual_seed(0)
    targets = {"phi3": ["qkv_proj", "gate_up_proj"], "gpt2": ["c_attn", "c_fc"]}.get(name, ["q_proj", "v_proj",
                                                                                         "down_proj"])
    fresh = AutoModelForCausalLM.from_pretrained(d / "model", attn_implementation="eager")
    tuned = peft.get_peft_model(fresh, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    tuned.save_pretrained(d / "from_torch")
    want = logits(tuned)
    got = _ours(d / "model", d / "from_torch")
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want - logits(base)).max() > 1e-2  # the adapter does something
    assert jax.tree_util.tree_leaves(got)
