"""Frozen weights loaded straight into their shards (`--shard-frozen`, or chosen automatically when a
full copy would not fit one device), end to end on forced CPU devices and two local processes:

- a model whose full copy does not fit a (simulated: LORA_DEVICE_MEMORY_GB) device trains split
  over two, each device holding half, with the single-device run's losses; so does `--shard-frozen`
  over two processes; eval, generate, resume and a merged export work on the split run;
- a device count that divides no dimension of some tensors keeps those whole, says so once, trains;
- per process, loading takes host memory near S x (local devices) / N and reads about as many
  bytes (benchmarks/sharded_load.py, which RESULTS.md quotes at a larger S).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, free_port, host_devices_env

pytestmark = pytest.mark.slow  # starts subprocesses that train

TRAIN = ["--max-steps", "4", "--grad-accum", "1", "--seed", "3", "--save-every", "2", "--eval-every", "0",
         "--rouge-examples", "0",
         "--learning-rate", "0.03", "--max-length", "16"]


def _lora(args, env, wait=True):
    p = subprocess.Popen([sys.executable, "-m", "cli", *args], env={**env, "HF_HUB_OFFLINE": "1"}, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _done(p) if wait else p


def _done(p):
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return out, err


def _two_processes(args):
    port = free_port()
    procs = [_lora(args, dict(host_devices_env(1), LORA_COORDINATOR=f"127.0.0.1:{port}", LORA_NUM_PROCESSES="2",
                              LORA_PROCESS_ID=str(pid)), wait=False) for pid in range(2)]
    return [_done(p) for p in procs]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random-init Llama (fp32 safetensors, every dimension even) with the demo's tokenizer
    and rows; and its frozen bytes S."""
    from transformers import LlamaConfig

    from flax_lora import demo
    from flax_lora.models.decoder import load_decoder
    from flax_lora.models.weights import flax_to_torch, write_checkpoint

    d = tmp_path_factory.mktemp("llama")
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=32, max_position_embeddings=64, initializer_range=0.2,
                      bos_token_id=1, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    _, params, _ = load_decoder(cfg, seed=0)
    tensors = flax_to_torch(params, dtype=np.float32)
    cfg.save_pretrained(d / "model")
    write_checkpoint(d / "model", tensors, max_shard_bytes=20_000)  # sharded: several files and an index
    demo.save_tokenizer(demo.build_tokenizer(), d / "model")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo.make_rows(64, 0)))
    return d, sum(t.nbytes for t in tensors.values())


@pytest.fixture(scope="module")
def runs(llama, tmp_path_factory):
    """One device (a full copy); two devices of 0.75 S each (split automatically); `--shard-frozen`
    over two processes. Same global batch (4 rows) everywhere."""
    d, size = llama
    out = tmp_path_factory.mktemp("runs")
    common = ["train", "--model", str(d / "model"), "--data", str(d / "train.jsonl"), *TRAIN]
    small = dict(host_devices_env(2), LORA_DEVICE_MEMORY_GB=str(0.75 * size / 2**30))
    one = _lora([*common, "--output", str(out / "one"), "--batch-size", "4", "--quiet"], host_devices_env(1), wait=False)
    auto = _lora([*common, "--output", str(out / "auto"), "--batch-size", "2"], small, wait=False)
    results = {"one": _done(one), "auto": _done(auto)}
    results["multi"] = _two_processes([*common, "--output", str(out / "multi"), "--batch-size", "2", "--shard-frozen",
                                         "--quiet"])
    return out, size, small, results


def _losses(run):
    from flax_lora.training.rundir import RunDir

    return [(r["step"], r["loss"]) for r in RunDir(run).read_metrics() if "loss" in r]


def test_a_model_too_big_for_one_device_trains_split_over_two(runs):
    from flax_lora.training.rundir import RunDir

    out, size, small, results = runs
    limit = float(small["LORA_DEVICE_MEMORY_GB"]) * 2**30
    resolved = RunDir(out / "auto").load_resolved()
    assert resolved.frozen_sharded and resolved.devices == 2
    assert resolved.frozen_bytes_per_device == size // 2 < limit < size  # half on each; a full copy would not fit
    assert RunDir(out / "one").load_resolved().frozen_bytes_per_device == size
    _, err = results["auto"]
    assert err.count("splitting them over the 2 devices") == 1 and "stay whole" not in err
    import jax

    from flax_lora.adapters.native import load_adapter

    ref, ref_adapter = _losses(out / "one"), load_adapter(RunDir(out / "one").adapter)[0]
    for name in ("auto", "multi"):
        got = _losses(out / name)
        assert [s for s, _ in got] == [s for s, _ in ref] and ref
        np.testing.assert_allclose([l for _, l in got], [l for _, l in ref], rtol=1e-5)
        adapter = load_adapter(RunDir(out / name).adapter)[0]
        for x, y in zip(jax.tree_util.tree_leaves(ref_adapter), jax.tree_util.tree_leaves(adapter)):
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5)
    multi = RunDir(out / "multi").load_resolved()
    assert multi.processes == 2 and multi.frozen_sharded and multi.frozen_bytes_per_device == size // 2


def test_eval_generate_resume_and_export_on_the_split_run(llama, runs, tmp_path):
    out, size, small, _ = runs
    run = str(out / "auto")
    after = json.loads((out / "auto" / "eval.json").read_text())["after"]["loss"]
    res = json.loads(_lora(["eval", run, "--rouge-examples", "0"], small)[0])
    assert res["loss"] == pytest.approx(after, rel=1e-5)
    prompt = ["generate", run, "--prompt", "reverse 1 2 3", "--max-new-tokens", "6"]
    split_text, whole_text = _lora(prompt, small)[0], _lora(prompt, host_devices_env(1))[0]
    assert split_text == whole_text
    _lora(["train", "--output", run, "--resume", "--max-steps", "6", "--quiet"], small)
    assert [s for s, _ in _losses(run)] == [4, 6]  # logged at the end of each
    _lora(["export", run, "--format", "merged", "--out", str(tmp_path / "merged")], host_devices_env(1))
    from flax_lora.models.weights import checkpoint_refs

    merged, base = checkpoint_refs(tmp_path / "merged"), checkpoint_refs(llama[0] / "model")
    assert merged.keys() == base.keys()


def test_a_device_count_that_divides_nothing_keeps_those_tensors_whole(llama, tmp_path):
    from flax_lora.training.rundir import RunDir

    d, size = llama
    _, err = _lora(["train", "--model", str(d / "model"), "--data", str(d / "train.jsonl"), *TRAIN,
                    "--max-steps", "2", "--batch-size", "1", "--output", str(tmp_path / "r"), "--shard-frozen"],
                   host_devices_env(3))
    notes = [line for line in err.splitlines() if "stay whole" in line]
    assert len(notes) == 1 and "no dimension divisible by 3 devices" in notes[0]
    resolved = RunDir(tmp_path / "r").load_resolved()
    assert resolved.frozen_sharded and resolved.frozen_bytes_per_device == size  # 32/64 are not multiples of 3
    assert all(np.isfinite(l) for _, l in _losses(tmp_path / "r"))


def test_loading_memory_per_process_is_near_its_share(tmp_path):
    """benchmarks/sharded_load.py at a 52 MiB model: two processes, one device each, split: each
    process's resident peak grows by S/2 plus at most a few MiB (one leaf's slice in flight) and it
    reads S/2 of the files; one process with a full copy grows by S. The losses agree."""
    res = tmp_path / "res.json"
    subprocess.run([sys.executable, "benchmarks/sharded_load.py", "--preset", "test", "--steps", "2", "--json", str(res),
                    "--runs", "1x1 replicated,2x1 sharded"], cwd=ROOT, env=host_devices_env(1), check=True,
                   capture_output=True, timeout=900)
    r = json.loads(res.read_text())
    size, slack = r["size"], 12 * 2**20
    (whole,) = r["runs"]["1x1 replicated"]
    assert whole["peak"] - whole["rss_before"] >= 0.95 * size
    for p in r["runs"]["2x1 sharded"]:
        assert p["peak"] - p["rss_before"] <= size / 2 + slack, p
        assert size / 2 <= p["read"] <= size / 2 + slack and p["per_device"] == size // 2
    assert all(r["losses_equal_first_run"].values())


QUANTIZED = """
import sys, numpy as np
from flax.traverse_util import flatten_dict
from flax_lora import nf4
from flax_lora.models.registry import load_model
from flax_lora.quant import quantize_as
from flax_lora.training.parallel import FrozenPlan, bytes_per_device, tree_bytes
for scan in (True, False):
    whole = load_model(sys.argv[1], scan=scan).params
    for method in ("int8", "nf4", "nf4-dq"):
        got = load_model(sys.argv[1], scan=scan, placement=FrozenPlan(shard=True, quantization=method)).params
        want = quantize_as(whole, method)
        quarter, small = tree_bytes(want) // 4, 1024 if method == "nf4-dq" else 0  # nf4-dq: tiny scales stay whole
        assert quarter <= bytes_per_device(got) <= quarter + small, (method, bytes_per_device(got), quarter)
        if method == "nf4-dq":  # the per-layer mean of the absmax values is summed in another order
            got, want = nf4.dequantize_params(got), nf4.dequantize_params(want)
        g, w = flatten_dict(got), flatten_dict(want)
        assert g.keys() == w.keys()
        for k in w:
            a, b, where = np.asarray(g[k]), np.asarray(w[k]), f"{method} scan={scan} {'/'.join(k)}"
            if method == "nf4-dq":  # ulps of the mean: within 1e-6 relative
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=where)
            else:
                np.testing.assert_array_equal(a, b, err_msg=where)
print("quantized on the shards: equal")
"""


def test_int8_and_nf4_quantized_on_the_shards_equal_the_whole_tensors(llama):
    """Loaded split over 4 devices and quantized there (int8, nf4: bit for bit; nf4-dq: equal
    after dequantization), stacked and per-layer, each device holding a quarter (nf4-dq: plus its
    per-layer second-level scales, too small to split)."""
    d, _ = llama
    res = subprocess.run([sys.executable, "-c", QUANTIZED, str(d / "model")], cwd=ROOT, env=host_devices_env(4),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "quantized on the shards: equal" in res.stdout


def test_nf4_split_over_two_devices_trains_like_one(llama, tmp_path):
    d, _ = llama
    common = ["train", "--model", str(d / "model"), "--data", str(d / "train.jsonl"), *TRAIN, "--quiet",
              "--quantization", "nf4"]
    one = _lora([*common, "--output", str(tmp_path / "one"), "--batch-size", "4"], host_devices_env(1), wait=False)
    two = _lora([*common, "--output", str(tmp_path / "two"), "--batch-size", "2", "--shard-frozen"],
                host_devices_env(2), wait=False)
    _done(one), _done(two)
    ref, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in got] == [s for s, _ in ref] and ref
    np.testing.assert_allclose([l for _, l in got], [l for _, l in ref], rtol=1e-5)
