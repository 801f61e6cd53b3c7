"""`lora export --format gguf / gguf-lora`: the files, the output lines, and one-line errors (exit 2)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("gguf")

from cli.main import cli  # noqa: E402
from tests.flax_lora.adapters.gguf_helpers import build, read_gguf  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return build(tmp_path_factory.mktemp("gguf-cli"), "llama").run


def _export(*args):
    return CliRunner().invoke(cli, ["export", *map(str, args)])


def test_gguf_and_gguf_lora(run, tmp_path):
    r = _export(run, "--format", "gguf", "--gguf-type", "q8_0", "--out", tmp_path / "m.gguf")
    assert r.exit_code == 0, r.output
    assert f"wrote {tmp_path / 'm.gguf'} (" in r.output and "merged model, q8_0, llama" in r.output
    fields, tensors = read_gguf(tmp_path / "m.gguf")
    assert fields["general.file_type"] == 7 and tensors["blk.0.attn_q.weight"][0] == "Q8_0"
    r = _export(run / "adapter", "--format", "gguf-lora", "--out", tmp_path / "sub" / "l.gguf")
    assert r.exit_code == 0, r.output
    assert "LoRA adapter, f32, llama" in r.output and "--lora" in r.output
    assert read_gguf(tmp_path / "sub" / "l.gguf")[0]["adapter.type"] == "lora"
    assert "frozen weights" not in r.output  # no run_config.json: nothing to say about quantization


def test_quantized_run_says_where_the_weights_came_from(run, tmp_path):
    (run / "run_config.json").write_text(json.dumps({"quantization": "nf4"}))
    try:
        r = _export(run, "--format", "gguf", "--out", tmp_path / "m.gguf")
    finally:
        (run / "run_config.json").unlink()
    assert r.exit_code == 0, r.output
    assert "merged model, f16, llama" in r.output
    assert "trained on nf4 frozen weights: the float32 adapter was applied to the base model's unquantized weights" in r.output


def test_bad_input_is_one_line_exit_2(run, tmp_path):
    (tmp_path / "taken.gguf").write_text("x")
    cases = [
        (["--format", "gguf", "--out", tmp_path / "taken.gguf"], "taken.gguf exists (use --force to overwrite it)"),
        (["--format", "gguf-lora", "--out", tmp_path], "is a directory; --format gguf-lora writes one file"),
        (["--format", "peft", "--gguf-type", "q8_0", "--out", tmp_path / "p"], "--gguf-type is for --format gguf"),
        (["--format", "gguf-lora", "--gguf-type", "f16", "--out", tmp_path / "l.gguf"], "--gguf-type is for --format gguf"),
    ]
    for args, message in cases:
        r = _export(run, *args)
        assert r.exit_code == 2 and message in r.output, (args, r.output)
        assert "Traceback" not in r.output
    assert (tmp_path / "taken.gguf").read_text() == "x" and not (tmp_path / "l.gguf").exists()
    r = _export(run, "--format", "gguf", "--force", "--out", tmp_path / "taken.gguf")
    assert r.exit_code == 0 and (tmp_path / "taken.gguf").stat().st_size > 1000


def test_unsupported_family_names_the_supported_ones(tmp_path):
    from flax_lora.adapters.native import save_adapter
    from flax_lora.lora import LinearInfo, LoraConfig
    import numpy as np

    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    tree = {"transformer": {"h": {"0": {"attn": {"c_attn": {"a": np.ones((8, 2), np.float32), "b": np.ones((2, 24), np.float32)}}}}}}
    info = {"transformer/h/0/attn/c_attn": LinearInfo("transformer/h/0/attn/c_attn", "conv1d", 8, 24)}
    save_adapter(tmp_path / "run" / "adapter", tree, LoraConfig(2, 4), info, target_modules=["c_attn"],
                 base_model=str(tmp_path / "gpt2"), model_type="gpt2")
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), "--format", "gguf", "--out", str(tmp_path / "g.gguf")])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        "error: GGUF export supports llama, mistral, qwen2, qwen3, smollm3, olmo2 models; this one is 'gpt2' "
        "(use --format merged or peft)"]
