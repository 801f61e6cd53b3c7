"""Packed training equals unpacked on a tiny Llama: per-example logits, the step's loss and
gradients (fused and unfused loss, scanned and unrolled layers, accumulation, data parallel over
two CPU devices), and `lora train --packing` end to end; the GPT-2 port packs too; families that
cannot pack (transformers' Flax classes, legacy) refuse."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advisor.examples import Example
from flax_lora.data.batch import collate, collate_packed, first_fit
from flax_lora.lora import LoraConfig, init_lora
from flax_lora.targets import resolve_targets

from tests.helpers import host_devices_env, run_config

LC = LoraConfig(r=4, alpha=8)
LENGTHS = (5, 9, 3, 12, 7, 6, 10, 4)


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, initializer_range=0.2)


def _model(scan: bool, remat: bool = False):
    from flax_lora.models.base import CausalLM
    from flax_lora.models.decoder import load_decoder

    cfg = _config()
    module, params, _ = load_decoder(cfg, scan=scan, remat=remat)
    return CausalLM(module, params, cfg, "llama", "test", layers_stacked=scan)


def _examples():
    """Examples whose first token is a target in some (a text document without BOS has that)."""
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate(LENGTHS):
        mask = (np.arange(n) >= n // 3).astype(np.int32)
        mask[0] = i % 2
        out.append(Example(rng.integers(3, 64, n).astype(np.int32), mask, 0, "", ""))
    return out


def _batches(k: int, multiple: int = 1):
    """The same examples unpacked ([k, 8/k, 16]) and packed by first fit ([k, b, 32], b a
    ``multiple``, empty rows filling it)."""
    ex = _examples()
    plain = collate(ex, 16, 0)
    rows = first_fit(LENGTHS, 32, range(len(ex)))
    b = -(-len(rows) // (k * multiple)) * multiple
    packed = collate_packed([[ex[i] for i in r] for r in rows] + [None] * (k * b - len(rows)), 32, 0)
    shape = lambda x, k: {key: jnp.asarray(v.reshape(k, -1, v.shape[-1])) for key, v in x.items()}
    return shape(plain, k), shape(packed, k)


def test_packed_rows_give_each_example_its_own_logits(monkeypatch):
    """Each example's logits in a packed row equal its logits alone, even where fused attention
    would be picked (packed rows always take explicit scores)."""
    monkeypatch.setenv("LORA_ATTENTION", "auto")
    model, ex = _model(scan=False), _examples()  # scanned layers: the step tests below
    packed = collate_packed([ex[:3]], 32, 0)
    run = jax.jit(lambda ids, mask, seg, pos: model.logits({"params": model.params}, ids, mask, segment_ids=seg,
                                                           position_ids=pos))
    got = np.asarray(run(*(jnp.asarray(packed[k]) for k in ("input_ids", "attention_mask", "segment_ids",
                                                               "position_ids"))))
    plain = collate(ex[:3], 16, 0)  # one example per row
    alone = np.asarray(jax.jit(lambda ids, mask: model.logits({"params": model.params}, ids, mask))(
        jnp.asarray(plain["input_ids"]), jnp.asarray(plain["attention_mask"])))
    at = 0
    for i, e in enumerate(ex[:3]):
        np.testing.assert_allclose(got[0, at:at + len(e.ids)], alone[i, :len(e.ids)], atol=2e-5)
        at += len(e.ids)


def test_gpt2_port_packs_too(tiny_models):
    """The GPT-2 port confines attention to each packed example and restarts its learned positions:
    each example's logits in a packed row are its logits alone."""
    model, ex = tiny_models["gpt2"], _examples()
    assert model.check_packing(True) is True
    packed = collate_packed([ex[:3]], 32, 0)
    got = np.asarray(model.logits({"params": model.params}, *(jnp.asarray(packed[k]) for k in (
        "input_ids", "attention_mask")), segment_ids=jnp.asarray(packed["segment_ids"]),
        position_ids=jnp.asarray(packed["position_ids"])))
    plain = collate(ex[:3], 16, 0)
    alone = np.asarray(model.logits({"params": model.params}, jnp.asarray(plain["input_ids"]),
                                    jnp.asarray(plain["attention_mask"])))
    at = 0
    for i, e in enumerate(ex[:3]):
        np.testing.assert_allclose(got[0, at:at + len(e.ids)], alone[i, :len(e.ids)], atol=2e-5)
        at += len(e.ids)


@pytest.mark.legacy
def test_families_without_segment_ids_refuse_packing(tiny_models):
    from flax_lora.errors import UserError

    opt = tiny_models["opt"]  # transformers' Flax class (the legacy extra)
    assert opt.check_packing(False) is False and _model(scan=False).check_packing(True) is True
    with pytest.raises(UserError, match="--packing needs a family on the project's decoder port.*opt") as err:
        opt.check_packing(True)
    assert "\n" not in str(err.value)
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(UserError, match="--packing"):
        opt.logits({"params": opt.params}, ids, ids, segment_ids=ids)


def _one_step(model, batch):
    """(loss, gradient) of one train step: plain SGD at rate 1, so the update is minus the gradient."""
    from flax_lora.training.step import init_state, make_train_step

    lora = model.stack_lora(init_lora(resolve_targets(model.linears(), "llama", preset="attention-mlp"), LC.r,
                                      jax.random.PRNGKey(1)))
    lora = jax.tree_util.tree_map(lambda x: x + 0.1, lora)  # B != 0: gradients reach A as well
    opt = optax.sgd(1.0)
    step = make_train_step(model, LC, opt, lambda s: 1.0)
    state, metrics = step(init_state(lora, opt, 0), model.params, batch)
    grad = jax.tree_util.tree_map(lambda a, b: a - b, lora, state.lora)
    return float(metrics["loss"]), float(metrics["tokens"]), grad


def _assert_same_step(model, k: int):
    plain, packed = _batches(k)
    loss_u, n_u, g_u = _one_step(model, plain)
    loss_p, n_p, g_p = _one_step(model, packed)
    assert n_u == n_p == sum(int(e.loss_mask[1:].sum()) for e in _examples())
    np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5)
    # fp32 rounding only: the same comparison in float64 differs by 1e-7 (the fp32 adapter's rounding)
    for a, b in zip(jax.tree_util.tree_leaves(g_u), jax.tree_util.tree_leaves(g_p)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4 * float(np.abs(a).max()))


@pytest.mark.slow
@pytest.mark.parametrize("scan,remat,k,fused", [(True, False, 1, "1"), (True, False, 2, "1"), (False, False, 2, "1"),
                                                (True, False, 2, "0"), (True, True, 2, "1"), (False, True, 1, "1")])
def test_packed_step_equals_unpacked(monkeypatch, scan, remat, k, fused):
    monkeypatch.setenv("LORA_FUSED_LOSS", fused)
    _assert_same_step(_model(scan, remat), k)


def dp_worker(out: str) -> None:
    """In a process with 2 forced CPU devices: one packed step through DataParallel and one on a
    single device; writes both losses and gradients (run by the test below)."""
    from flax.traverse_util import flatten_dict

    from flax_lora.training.parallel import DataParallel, to_host
    from flax_lora.training.step import init_state, make_train_step

    assert jax.device_count() == 2
    model, (_, packed) = _model(scan=True), _batches(2, multiple=2)  # [2, 2, 32]: a row per device
    lora = model.stack_lora(init_lora(resolve_targets(model.linears(), "llama", preset="attention"), LC.r,
                                      jax.random.PRNGKey(1)))
    opt = optax.sgd(1.0)
    step = make_train_step(model, LC, opt, lambda s: 1.0)
    dp = DataParallel()
    single = step(init_state(lora, opt, 0), model.params, packed)
    multi = dp.wrap(step, model.params)(dp.put_state(init_state(lora, opt, 0)), dp.put_frozen(model.params),
                                        dp.put_batch({k: np.asarray(v) for k, v in packed.items()}))
    res = {}
    for name, (state, metrics) in (("single", single), ("multi", multi)):
        res[f"{name}/loss"] = np.asarray(to_host(metrics["loss"]))
        res.update({f"{name}/" + "/".join(p): v for p, v in flatten_dict(to_host(state.lora)).items()})
    np.savez(out, **res)


@pytest.mark.slow
def test_packed_step_is_the_same_data_parallel(tmp_path):
    out = tmp_path / "dp.npz"
    code = f"from tests.flax_lora.training.test_packing import dp_worker; dp_worker({str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=host_devices_env(2), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = dict(np.load(out))
    np.testing.assert_allclose(r["multi/loss"], r["single/loss"], rtol=1e-5)
    for key in (k for k in r if k.startswith("single/") and k != "single/loss"):
        np.testing.assert_allclose(r[key.replace("single/", "multi/")], r[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_lora_train_packing_end_to_end(tmp_path):
    """`lora train --packing` on a tiny Llama: fewer steps per epoch, finite losses, the run resumes
    (the legacy families' refusal: test_families_without_segment_ids_refuse_packing)."""
    from flax_lora import demo
    from flax_lora.models import hub
    from flax_lora.models.decoder import causal_lm_from_config
    from flax_lora.training.loop import train
    from flax_lora.training.rundir import RunDir

    cfg = _config()
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 32, 1, 1, 0
    hub.save_pt_safetensors(tmp_path / "model", causal_lm_from_config(cfg, seed=0).params, cfg)
    demo.save_tokenizer(demo.build_tokenizer(), tmp_path / "model")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo.make_rows(64, 0)))
    steps = dict(max_steps=4, log_every=2, save_every=2, eval_every=0, rouge_examples=2, max_new_tokens=2,
                 batch_size=2, grad_accum=1, max_length=64, target_preset="attention", seed=0, dropout=0.0)
    # short rows for max_length 64 on the port: the advisor packs unless told not to
    plain = run_config(tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "plain", packing=False, **steps)
    packed = run_config(tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "packed", packing=True, **steps)
    train(plain, quiet=True)
    train(packed, quiet=True)
    spe = lambda d: RunDir(d).load_resolved().steps_per_epoch
    assert spe(tmp_path / "packed") < spe(tmp_path / "plain")
    losses = [r["loss"] for r in RunDir(tmp_path / "packed").read_metrics() if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
