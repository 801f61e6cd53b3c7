"""Reading checkpoints by slices (flax_lora.models.weights): only the covered byte ranges are read,
the values are numpy's slicing of the whole tensor, and a model's params read leaf by leaf equal
the whole-checkpoint mapping (torch_to_flax), stacked layers and sharded checkpoints included."""

from __future__ import annotations

import builtins

import ml_dtypes
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from flax_lora.errors import UserError
from flax_lora.models import weights as W


@pytest.fixture()
def ckpt(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((37, 11)).astype(np.float32),
               "b16": rng.standard_normal((5, 6, 7)).astype(ml_dtypes.bfloat16),
               "v": np.arange(9, dtype=np.int64)}
    W.write_checkpoint(tmp_path, tensors, max_shard_bytes=600)  # several files + index
    assert (tmp_path / W.INDEX).is_file()
    return tmp_path, tensors


class _Counting:
    """Counts the bytes read through ``open`` in flax_lora.models.weights."""

    def __init__(self):
        self.read = 0
        self.sizes = []  # bytes asked for by each read

    def __call__(self, *args, **kwargs):
        f = builtins.open(*args, **kwargs)
        inner, counter = f.readinto, self

        class Wrapped:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def seek(self, *a):
                return f.seek(*a)

            def readinto(self, buf):
                n = inner(buf)
                counter.read += n
                counter.sizes.append(len(memoryview(buf).cast("B")))
                return n

        return Wrapped()


@pytest.mark.parametrize("index", [None, (slice(3, 20), slice(2, 9)), (slice(0, 37), slice(5, 6)), (slice(36, 37),)])
def test_read_slice_is_numpy_slicing(ckpt, monkeypatch, index):
    folder, t = ckpt
    monkeypatch.setattr(W, "READ_CHUNK_BYTES", 100)  # several chunks per slice
    refs = W.checkpoint_refs(folder)
    np.testing.assert_array_equal(W.read_slice(refs["w"], index), t["w"][index] if index else t["w"])
    flipped = index[::-1] if index else None
    np.testing.assert_array_equal(W.read_slice(refs["w"], flipped, transpose=True),
                                  t["w"].T[flipped] if index else t["w"].T)
    got = W.read_slice(refs["b16"], (slice(1, 3), slice(None), slice(2, 5)), np.float32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, t["b16"][1:3, :, 2:5].astype(np.float32))


def test_a_row_range_reads_only_its_bytes_and_a_column_range_a_chunk_at_a_time(ckpt, monkeypatch):
    folder, t = ckpt
    refs = W.checkpoint_refs(folder)
    counting = _Counting()
    monkeypatch.setattr(W, "open", counting, raising=False)
    W.read_slice(refs["w"], (slice(10, 14),))
    assert counting.read == 4 * 11 * 4  # rows 10-13, nothing else
    counting.read, counting.sizes = 0, []
    monkeypatch.setattr(W, "READ_CHUNK_BYTES", 2 * 11 * 4)
    W.read_slice(refs["w"], (slice(None), slice(3, 4)))
    assert counting.read == t["w"].nbytes  # every row holds a piece of the column...
    assert max(counting.sizes) == 2 * 11 * 4  # ...read two rows at a time


def test_checkpoint_refs_read_only_headers_and_refuse_a_truncated_file(tmp_path):
    W.write_checkpoint(tmp_path, {"x": np.ones((64, 64), np.float32)})
    path = tmp_path / W.SINGLE
    ref = W.tensor_refs(path)["x"]
    assert ref.shape == (64, 64) and ref.offset + ref.nbytes == path.stat().st_size
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(UserError, match="past the end"):
        W.tensor_refs(path)


def _llama_folder(folder, tied=False):
    from transformers import LlamaConfig

    from flax_lora.models.decoder import load_decoder

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=48, max_position_embeddings=64, tie_word_embeddings=tied)
    _, params, _ = load_decoder(cfg, seed=3)
    cfg.save_pretrained(folder)
    W.write_checkpoint(folder, W.flax_to_torch(params, dtype=ml_dtypes.bfloat16), max_shard_bytes=8000)
    return cfg


@pytest.mark.parametrize("scan", [False, True])
def test_load_params_equals_the_whole_checkpoint_mapping(tmp_path, scan):
    import jax.numpy as jnp

    from flax_lora.models.base import param_shapes
    from flax_lora.models.decoder import DecoderLM
    from flax_lora.models.stacking import stack_layers

    cfg = _llama_folder(tmp_path)
    module = DecoderLM(cfg, scan=scan)
    got = flatten_dict(W.load_params(tmp_path, param_shapes(module), dtype=jnp.float32))
    want = W.torch_to_flax(W.read_checkpoint(tmp_path), param_shapes(module.clone(scan=False)), dtype=np.float32)
    want = flatten_dict(stack_layers(want, 3) if scan else want)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg="/".join(k))


def test_a_tied_head_is_read_from_the_embedding_and_a_missing_tensor_named(tmp_path):
    import jax

    _llama_folder(tmp_path, tied=True)
    refs = W.checkpoint_refs(tmp_path)
    emb = ("model", "embed_tokens", "embedding")
    template = {"lm_head": {"kernel": jax.ShapeDtypeStruct((32, 48), np.float32)},
                "model": {"embed_tokens": {"embedding": jax.ShapeDtypeStruct((48, 32), np.float32)}}}
    got = W.load_params(tmp_path, template, dtype=np.float32, tied_embedding=emb)
    want = refs["model.embed_tokens.weight"]
    np.testing.assert_array_equal(np.asarray(got["lm_head"]["kernel"]), W.read_slice(want, None, np.float32).T)
    with pytest.raises(UserError, match="no tensor lm_head.weight"):
        W.load_params(tmp_path, template, dtype=np.float32)
    template["model"]["embed_tokens"]["embedding"] = jax.ShapeDtypeStruct((48, 16), np.float32)
    with pytest.raises(UserError, match=r"has shape \(48, 32\), the model expects \(48, 16\)"):
        W.load_params(tmp_path, template, dtype=np.float32, tied_embedding=emb)
