"""PyTorch-layout safetensors <-> Flax params trees, without torch.

Reading: a single ``model.safetensors`` or a sharded ``model.safetensors.index.json`` (which
transformers 4.57's Flax ``from_pretrained`` rejects with NotImplementedError). bfloat16 is
read through ``ml_dtypes`` (``safetensors.numpy`` cannot), tensors are memory-mapped.

Name mapping follows transformers' own PyTorch<->Flax convention, so it serves every family
whose Flax port mirrors the PyTorch module names (Llama family, GPT-2, OPT, GPT-Neo, ...):

    flax ``a/b/kernel``     <-> torch ``a.b.weight`` transposed (2-D; also GPT-2's Conv1D,
                                whose Flax kernel is [out, in] and torch weight [in, out])
    flax ``a/b/embedding``  <-> torch ``a.b.weight``
    flax ``a/b/scale``      <-> torch ``a.b.weight``   (LayerNorm)
    flax ``a/b/weight``     <-> torch ``a.b.weight``   (RMSNorm)
    flax ``a/b/bias``       <-> torch ``a.b.bias``

Checkpoints saved from a base model (e.g. ``gpt2``: ``h.0...`` instead of ``transformer.h.0...``)
are matched by dropping the first Flax path component. A missing ``lm_head`` with tied
embeddings is filled from the embedding.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from flax_lora.errors import UserError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


# ----------------------------------------------------------------------------- safetensors I/O


def _header(path: Path) -> tuple[int, dict]:
    """(header length, header dict) of a safetensors file, checked against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise UserError(f"{path}: not a safetensors file (header of {n} bytes in a {size}-byte file; truncated?)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (header is not an object)")
    return n, header


def read_safetensors_metadata(path: str | Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file (e.g. ``{"format": "pt"}``)."""
    return _header(Path(path))[1].get("__metadata__")


def read_safetensors_file(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as (memory-mapped, read-only) numpy arrays.

    A truncated or garbled file is a UserError naming it.
    """
    path = Path(path)
    n, header = _header(path)
    header.pop("__metadata__", None)
    mm = np.memmap(path, dtype=np.uint8, mode="r") if header else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise UserError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= len(mm) - 8 - n:
                raise UserError(f"{path}: tensor {name} lies past the end of the file (truncated?)")
            out[name] = mm[8 + n + start : 8 + n + end].view(dtype).reshape(info["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: tensor {name} is malformed ({type(exc).__name__}: {exc})") from None
    return out


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (single or sharded)."""
    directory = Path(directory)
    if (directory / INDEX).is_file():
        index = json.loads((directory / INDEX).read_text())
        return [directory / f for f in sorted(set(index["weight_map"].values()))]
    if (directory / SINGLE).is_file():
        return [directory / SINGLE]
    raise UserError(f"{directory}: no {SINGLE} or {INDEX} (PyTorch safetensors checkpoint) found")


def read_checkpoint(directory: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a PyTorch safetensors checkpoint directory, single file or sharded."""
    tensors: dict[str, np.ndarray] = {}
    for f in checkpoint_files(directory):
        tensors.update(read_safetensors_file(f))
    return tensors


def safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise numpy tensors (bfloat16 included) in the safetensors format."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset, blobs = 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _NAMES:
            raise ValueError(f"{name}: cannot store dtype {arr.dtype}")
        blob = arr.tobytes()
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def write_checkpoint(directory: str | Path, tensors: Mapping[str, np.ndarray], max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write ``model.safetensors`` (or shards + index past ``max_shard_bytes``) atomically."""
    from advisor.io import atomic_write_bytes, atomic_write_json

    directory = Path(directory)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_write_bytes(directory / SINGLE, safetensors_bytes(shards[0], meta))
        return [directory / SINGLE]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        atomic_write_bytes(directory / fname, safetensors_bytes(shard, meta))
        weight_map.update({k: fname for k in shard})
        names.append(directory / fname)
    total = sum(t.nbytes for t in tensors.values())
    atomic_write_json(directory / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


# ----------------------------------------------------------------------------- name mapping


def torch_key(flax_path: tuple[str, ...]) -> tuple[str, bool]:
    """(torch state-dict key, transpose?) for one flattened Flax param path."""
    *mod, leaf = flax_path
    name = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join([*mod, name]), leaf == "kernel"


def _cast(x: np.ndarray, dtype) -> np.ndarray:
    return x if dtype is None else np.asarray(x).astype(np.dtype(dtype), copy=False)


def torch_to_flax(
    tensors: Mapping[str, np.ndarray],
    template: Mapping,
    *,
    dtype=None,
    tied_embedding: tuple[str, ...] | None = None,
) -> dict:
    """Build a Flax params tree shaped like ``template`` from a PyTorch state dict.

    ``template`` is a params tree (arrays or ``jax.ShapeDtypeStruct``, e.g. from
    ``jax.eval_shape(module.init, ...)``). ``dtype`` casts every leaf (None keeps the
    checkpoint's). ``tied_embedding`` is the Flax path of the embedding to use for a
    ``lm_head/kernel`` that the checkpoint omits. A missing tensor or a shape mismatch is a
    UserError naming it; tensors the template does not use (buffers) are ignored.
    """
    out = {}
    for path, spec in flatten_dict(dict(template)).items():
        key, transpose = torch_key(path)
        candidates = [key, key.split(".", 1)[1] if "." in key else key]
        found = next((c for c in candidates if c in tensors), None)
        if found is not None:
            value = tensors[found]
            value = value.T if transpose and value.ndim == 2 else value
        elif path[-2:] == ("lm_head", "kernel") and tied_embedding is not None:
            key = "/".join(tied_embedding) + " (tied)"
            value = tensors.get(torch_key(tied_embedding)[0])
            if value is None:
                value = tensors[torch_key(tied_embedding)[0].split(".", 1)[1]]
            value = value.T
        else:
            raise UserError(f"checkpoint has no tensor {key} (for Flax parameter {'/'.join(path)})")
        if tuple(value.shape) != tuple(spec.shape):
            raise UserError(
                f"checkpoint tensor {found or key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(spec.shape)} for {'/'.join(path)}"
            )
        out[path] = np.ascontiguousarray(_cast(value, dtype if dtype is not None else None))
    return unflatten_dict(out)


def flax_to_torch(params: Mapping, *, dtype=None, skip: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """PyTorch-layout state dict (numpy) of a per-layer Flax params tree (the reverse mapping).

    ``skip`` lists torch keys to leave out (e.g. a tied ``lm_head.weight``).
    """
    skip = set(skip)
    out = {}
    for path, value in flatten_dict(dict(params)).items():
        key, transpose = torch_key(path)
        if key in skip:
            continue
        value = np.asarray(value)
        if transpose and value.ndim == 2:
            value = value.T
        out[key] = np.ascontiguousarray(_cast(value, dtype))
    return out
