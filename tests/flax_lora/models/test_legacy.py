"""The flax-legacy extra: OPT, GPT-Neo, GPT-J and BLOOM run on transformers' Flax classes, which
only transformers < 5 has; without them such a family is refused with a one-line hint (exit 2),
while the ported families (GPT-2 included) never need them. And the GPT-2 port replaces
transformers' Flax GPT-2 without changing a demo: same weights from the same seed, same logits."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

HINT = "model type 'opt' needs transformers' Flax classes: pip install \"lora[flax-legacy]\""


def _opt_config():
    from transformers import OPTConfig

    return OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32,
                     word_embed_proj_dim=16, max_position_embeddings=32)


@pytest.fixture
def no_flax(monkeypatch):
    """transformers' Flax classes absent, as with transformers 5 (where this is true anyway)."""
    from flax_lora.models import hf

    monkeypatch.setattr(hf, "flax_available", lambda: False)


def test_legacy_family_without_flax_classes_is_a_one_line_hint(no_flax, tmp_path):
    from flax_lora.errors import UserError
    from flax_lora.models import load_model
    from flax_lora.models.registry import from_config

    with pytest.raises(UserError) as err:
        from_config(_opt_config())
    assert str(err.value) == HINT
    _opt_config().save_pretrained(tmp_path)
    with pytest.raises(UserError, match="flax-legacy"):
        load_model(str(tmp_path))


def test_a_family_neither_ported_nor_legacy_is_unsupported_not_an_install_hint():
    from transformers import XGLMConfig

    from flax_lora.errors import UserError
    from flax_lora.models.registry import from_config

    with pytest.raises(UserError, match=r"model type 'xglm' is not supported; the project's ports: .*gpt2.*llama.*"
                                        r"with the flax-legacy extra: opt, gpt_neo, gptj, bloom$"):
        from_config(XGLMConfig(d_model=16, num_layers=1, attention_heads=2, ffn_dim=32, vocab_size=32))


def test_lora_train_on_a_legacy_family_exits_2_with_the_hint(no_flax, tmp_path, demo_assets):
    from cli.main import cli
    from flax_lora import demo

    _opt_config().save_pretrained(tmp_path / "opt")
    demo.save_tokenizer(demo.build_tokenizer(), tmp_path / "opt")
    _, train, _ = demo_assets
    res = CliRunner().invoke(cli, ["train", "--model", str(tmp_path / "opt"), "--data", str(train), "--output",
                                   str(tmp_path / "run"), "--max-steps", "1"])
    assert res.exit_code == 2, res.output
    assert HINT in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()


def test_a_folder_without_tokenizer_files_is_a_user_error(tmp_path):
    from flax_lora.errors import UserError
    from flax_lora.models import load_tokenizer

    _opt_config().save_pretrained(tmp_path)
    with pytest.raises(UserError, match="no usable tokenizer"):
        load_tokenizer(str(tmp_path))


def test_a_tokenizer_without_tokenizer_json_is_converted(tmp_path):
    """GPT-2's vocab.json + merges.txt (no tokenizer.json) become a fast tokenizer through
    transformers' conversion, in 4.57 and 5.x alike, with the files' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config

    from flax_lora.models import load_tokenizer
    from tests.helpers import CORPUS

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.model.save(str(tmp_path))  # vocab.json, merges.txt
    GPT2Config(vocab_size=300, bos_token_id=0, eos_token_id=0).save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok.vocab_size() == bpe.get_vocab_size() > 250
    assert tok.backend.encode("The capital of France").ids == bpe.encode("The capital of France").ids


def test_ported_families_need_no_flax_classes(no_flax):
    """GPT-2 (the demo's model) and Gemma 1 load on the ports with the Flax classes gone."""
    from transformers import GemmaConfig, GPT2Config

    from flax_lora.models.registry import from_config

    for cfg in (GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16),
                GemmaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=8, intermediate_size=32, vocab_size=32)):
        m = from_config(cfg)
        ids = jnp.ones((1, 4), jnp.int32)
        assert m.logits({"params": m.params}, ids, ids).shape == (1, 4, 32)


@pytest.mark.legacy
def test_gpt2_port_draws_transformers_flax_weights_and_logits():
    """Same params tree and weights from the same seed as transformers' FlaxGPT2LMHeadModel (so the
    demo trains the model it trained before), logits within float32 rounding, padding included."""
    from flax.traverse_util import flatten_dict
    from transformers import AutoConfig, FlaxGPT2LMHeadModel

    from flax_lora.demo import ASSETS
    from flax_lora.models.gpt2 import causal_lm_from_config

    cfg = AutoConfig.for_model(**json.loads((ASSETS / "config.json").read_text()))
    ours = causal_lm_from_config(cfg, seed=0)
    hf = FlaxGPT2LMHeadModel(cfg, _do_init=False)
    ref = jax.jit(hf.init_weights, static_argnums=1)(jax.random.PRNGKey(0), (1, 1))
    a, b = flatten_dict(ours.params), flatten_dict(ref)
    assert set(a) == set(b)
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10)))
    mask = jnp.ones_like(ids).at[1, 7:].set(0)
    pos = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
    want = hf.module.apply({"params": ref}, ids, mask, pos).logits
    got = ours.logits({"params": ours.params}, ids, mask)
    np.testing.assert_allclose(np.asarray(got)[0], np.asarray(want)[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(got)[1, :7], np.asarray(want)[1, :7], atol=1e-5)
