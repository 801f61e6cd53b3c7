"""flax_lora.perf.compiled (behind benchmarks/memory_check.py and hlo_bytes.py): cases, the step
compiled on abstract arguments, its memory analysis; flax_lora.perf.estimates: the advisor's side."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from flax_lora.perf import compiled, estimates
from flax_lora.perf.shapes import PRESETS, llama_params


def test_parse_case():
    assert compiled.parse_case("llama-1b:4:2048:bf16") == {
        "preset": "llama-1b", "batch": 4, "seq": 2048, "precision": "bf16", "quantization": "none",
        "remat": False, "scan": True}
    case = compiled.parse_case("tiny:2:64:fp32:int8:remat:noscan")
    assert (case["quantization"], case["remat"], case["scan"]) == ("int8", True, False)


def test_loss_chunks_cover_every_target():
    from flax_lora.training.losses import default_chunk

    case = compiled.parse_case("llama-1b:4:2048:bf16")
    n = 4 * 2047
    assert compiled.loss_chunks(case) == math.ceil(n / default_chunk(PRESETS["llama-1b"]["vocab"], n))
    assert compiled.loss_chunks(case) * default_chunk(PRESETS["llama-1b"]["vocab"], n) >= n


def test_memory_gb_peak_is_arguments_temporaries_and_unaliased_outputs():
    gib = 2**30
    ma = SimpleNamespace(argument_size_in_bytes=3 * gib, temp_size_in_bytes=2 * gib, output_size_in_bytes=gib,
                         alias_size_in_bytes=gib)
    assert compiled.memory_gb(ma) == {"argument_gb": 3, "temp_gb": 2, "output_gb": 1, "alias_gb": 1,
                                      "xla_peak_gb": 5}


def test_advisor_side_uses_the_benchmark_shape():
    shape = estimates.model_shape(PRESETS["smollm2-135m"], 128)
    assert shape.params == llama_params(PRESETS["smollm2-135m"]) and shape.max_positions == 2048
    out = estimates.advisor_gb(compiled.parse_case("smollm2-135m:4:128:fp32"))
    assert out["advisor_device_gb"] < out["advisor_total_gb"]
    assert out["advisor_total_gb"] == pytest.approx(sum(out["advisor_parts_gb"].values()))
    gb = estimates.advisor_estimate_gb(PRESETS["smollm2-135m"], r=8, targets=["q_proj", "v_proj"], batch=4, seq=128,
                                       precision="fp32", quantization="none", remat=False, platform="cpu")
    assert gb is not None and gb > 0


@pytest.mark.slow
@pytest.mark.parametrize("text", ["tiny:2:32:fp32", "tiny:1:32:bf16:int8:remat:noscan"])
def test_xla_peak_of_the_compiled_step(text):
    out = compiled.xla_peak(compiled.parse_case(text), r=4)
    assert out["xla_peak_gb"] == pytest.approx(out["argument_gb"] + out["temp_gb"] + out["output_gb"] - out["alias_gb"])
    assert 0 < out["xla_peak_gb"] < 0.1 and out["compile_seconds"] > 0


def test_a_catalog_model_is_a_case_preset_with_its_familys_config():
    from flax_lora.perf.shapes import bench_config, catalog_shape

    config = bench_config("gemma2-2b", 512)
    shape = catalog_shape("gemma2-2b")
    assert config.model_type == "gemma2" and (config.hidden_size, config.num_hidden_layers) == (shape.hidden, shape.n_layers)
    assert config.head_dim == 256 and config.attn_logit_softcapping == 50.0  # the family's defaults are kept
    assert bench_config("llama-1b", 128).model_type == "llama"
    with pytest.raises(ValueError, match="neither a benchmark preset"):
        catalog_shape("no-such-model-xyz")
