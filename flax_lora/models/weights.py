"""PyTorch-layout safetensors <-> Flax params trees, without torch.

Reading: a single ``model.safetensors`` or a sharded ``model.safetensors.index.json`` (which
transformers 4.57's Flax ``from_pretrained`` rejects with NotImplementedError). bfloat16 is
read through ``ml_dtypes`` (``safetensors.numpy`` cannot). :func:`read_checkpoint` memory-maps
whole tensors; :func:`load_params` builds a model's params leaf by leaf from the headers'
offsets, reading only the byte ranges each device's slice needs (:func:`read_slice`), straight
into the leaf's sharding (models bigger than one device, ``lora train --shard-frozen``).

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
import math
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

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


class TensorRef(NamedTuple):
    """Where one tensor of a safetensors file lies: file, dtype, shape, offset of its first byte."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def tensor_refs(path: str | Path) -> dict[str, TensorRef]:
    """Every tensor of one ``.safetensors`` file, from its header alone (no tensor data is read).

    A truncated or garbled file is a UserError naming it.
    """
    path = Path(path)
    n, header = _header(path)
    header.pop("__metadata__", None)
    data = path.stat().st_size - 8 - n
    out = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise UserError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
            if not 0 <= start <= end <= data:
                raise UserError(f"{path}: tensor {name} lies past the end of the file (truncated?)")
            if end - start != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{end - start} bytes for shape {list(shape)} in {info['dtype']}")
            out[name] = TensorRef(path, dtype, shape, 8 + n + start)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: tensor {name} is malformed ({type(exc).__name__}: {exc})") from None
    return out


def read_safetensors_file(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as (memory-mapped, read-only) numpy arrays.

    A truncated or garbled file is a UserError naming it.
    """
    refs = tensor_refs(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r") if refs else np.zeros(0, np.uint8)
    return {name: mm[r.offset:r.offset + r.nbytes].view(r.dtype).reshape(r.shape) for name, r in refs.items()}


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


def checkpoint_refs(directory: str | Path) -> dict[str, TensorRef]:
    """Where every tensor of a checkpoint directory (single file or sharded) lies; headers only."""
    refs: dict[str, TensorRef] = {}
    for f in checkpoint_files(directory):
        refs.update(tensor_refs(f))
    return refs


READ_CHUNK_BYTES = 16 * 2**20  # rows read at a time when a slice is not one contiguous range


def _bounds(index, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, stop) per dimension of ``index`` (slices with step 1, as shard indices are; None: all)."""
    index = tuple(index or ()) + (slice(None),) * (len(shape) - len(tuple(index or ())))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"slice {s} has step {step}; shards are contiguous")
        out.append((start, max(start, stop)))
    return out


def read_slice(ref: TensorRef, index=None, dtype=None, *, transpose: bool = False) -> np.ndarray:
    """``ref[index]`` in ``dtype`` (None: the file's), or ``ref.T[index]`` with ``transpose`` (2-D),
    read from the file without mapping it.

    Only the rows of axis 0 that the index covers are read (one contiguous byte range of the
    file), :data:`READ_CHUNK_BYTES` at a time; a slice of the other axes is cut from each chunk.
    So the host holds the result and one chunk, never the whole tensor. Why not a memory map:
    its pages count in the process's resident memory for as long as it is mapped.
    """
    if transpose and len(ref.shape) != 2:
        raise ValueError(f"transpose needs a 2-D tensor, got shape {ref.shape}")
    shape = ref.shape
    if transpose:  # an index into the transposed tensor: padded to both axes, then swapped
        index = (tuple(index or ()) + (slice(None),) * 2)[:2][::-1]
    bounds = _bounds(index, shape)
    out_shape = tuple(b - a for a, b in bounds)
    out = np.empty(out_shape[::-1] if transpose else out_shape, np.dtype(dtype) if dtype is not None else ref.dtype)
    if out.size == 0:
        return out
    (r0, r1), rest = bounds[0], tuple(slice(a, b) for a, b in bounds[1:])
    row_bytes = math.prod(shape[1:]) * ref.dtype.itemsize
    step = max(1, READ_CHUNK_BYTES // max(row_bytes, 1))
    with open(ref.file, "rb", buffering=0) as f:
        for s in range(r0, r1, step):
            e = min(r1, s + step)
            chunk = np.empty((e - s,) + shape[1:], ref.dtype)
            f.seek(ref.offset + s * row_bytes)
            if f.readinto(chunk.view(np.uint8).reshape(-1)) != chunk.nbytes:
                raise UserError(f"{ref.file}: ends inside a tensor (truncated?)")
            part = chunk[(slice(None),) + rest]
            if transpose:
                out[:, s - r0:e - r0] = part.T
            else:
                out[s - r0:e - r0] = part
    return out


def _layout(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> tuple[bytes, list[str]]:
    """(the 8-byte length + padded JSON header, tensor names in file order) of a safetensors file."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset, names = 0, sorted(tensors)
    for name in names:
        arr = tensors[name]
        if np.dtype(arr.dtype) not in _NAMES:
            raise ValueError(f"{name}: cannot store dtype {arr.dtype}")
        size = int(np.prod(arr.shape)) * np.dtype(arr.dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(arr.dtype)], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, names


def safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise numpy tensors (bfloat16 included) in the safetensors format."""
    head, names = _layout(tensors, metadata)
    return head + b"".join(np.ascontiguousarray(tensors[n]).tobytes() for n in names)


def _write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> None:
    """Write one safetensors file atomically, a tensor at a time (no copy of the whole file in
    memory): a temporary file beside ``path``, fsync, rename."""
    from advisor.io import atomic_open

    head, names = _layout(tensors, metadata)
    with atomic_open(path) as f:
        f.write(head)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name]).view(np.uint8).reshape(-1).data)


def write_checkpoint(directory: str | Path, tensors: Mapping[str, np.ndarray], max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write ``model.safetensors`` (or shards + index past ``max_shard_bytes``) atomically, each
    file streamed a tensor at a time."""
    from advisor.io import atomic_write_json

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
        _write_safetensors(directory / SINGLE, shards[0], meta)
        return [directory / SINGLE]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(directory / fname, shard, meta)
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


# ----------------------------------------------------------------------------- loading by slices


class LeafSource(NamedTuple):
    """The checkpoint tensors one Flax leaf is made of: one, or one per layer (stacked [L, ...])."""

    keys: tuple[str, ...]
    transpose: bool  # a 2-D kernel: the Flax leaf is the torch tensor transposed
    stacked: bool


def _find_key(refs: Mapping, path: tuple[str, ...]) -> tuple[str | None, bool, str]:
    """(checkpoint key or None, transpose?, the key asked for) of one per-layer Flax path."""
    key, transpose = torch_key(path)
    short = key.split(".", 1)[1] if "." in key else key  # saved from the base model (gpt2: h.0...)
    return next((k for k in (key, short) if k in refs), None), transpose, key


def _source(refs: Mapping, path: tuple[str, ...], shape: tuple[int, ...],
            tied_embedding: tuple[str, ...] | None) -> LeafSource:
    """The :class:`LeafSource` of one Flax leaf, its shape checked (a UserError names what is wrong)."""
    from flax_lora.models.stacking import STACK

    at = path.index(STACK) if STACK in path else None
    layers = [path[:at] + (str(i),) + path[at + 1:] for i in range(shape[0])] if at is not None else [path]
    want = shape[1:] if at is not None else shape
    keys, transpose = [], False
    for p in layers:
        found, transpose, key = _find_key(refs, p)
        if found is None and p[-2:] == ("lm_head", "kernel") and tied_embedding is not None:
            found, transpose, key = _find_key(refs, tied_embedding)
            transpose, key = True, key + " (tied lm_head)"
        if found is None:
            raise UserError(f"checkpoint has no tensor {key} (for Flax parameter {'/'.join(p)})")
        got = refs[found].shape
        got = got[::-1] if transpose and len(got) == 2 else got
        if tuple(got) != tuple(want):
            raise UserError(f"checkpoint tensor {found} has shape {tuple(got)}, the model expects {tuple(want)} "
                            f"for {'/'.join(p)}")
        keys.append(found)
    return LeafSource(tuple(keys), transpose and len(refs[keys[0]].shape) == 2, at is not None)


def read_leaf(refs: Mapping[str, TensorRef], src: LeafSource, index=None, dtype=None) -> np.ndarray:
    """The slice ``index`` (Flax layout) of one leaf, read from its checkpoint tensors: a stacked
    leaf reads only the layers (and within each only the rows) the slice covers."""
    if not src.stacked:
        return read_slice(refs[src.keys[0]], index, dtype, transpose=src.transpose)
    index = tuple(index or ())
    first = index[0] if index else slice(None)
    start, stop, _ = first.indices(len(src.keys))
    out = None
    for j, i in enumerate(range(start, stop)):  # filled layer by layer: no second copy of the slice
        part = read_slice(refs[src.keys[i]], index[1:] or None, dtype, transpose=src.transpose)
        if out is None:
            out = np.empty((stop - start,) + part.shape, part.dtype)
        out[j] = part
    if out is None:
        raise ValueError(f"empty layer slice {first} of {len(src.keys)} layers")
    return out


def _put_by_device(shape: tuple[int, ...], sharding, read: Callable):
    """A global array of ``shape`` in ``sharding`` from ``read(index)``, one local device at a time:
    each slice is read, copied to its device and dropped before the next is read, so the host
    holds one device's slice of one leaf (``jax.make_array_from_callback`` would first read every
    local device's slice). Devices holding the same slice (a replicated leaf) share one read."""
    import jax

    arrays, last = [], (None, None)
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple((s.start, s.stop) for s in index)
        if last[0] != key:
            last = (None, None)  # the previous slice goes before the next is read
            last = (key, read(index))
        arrays.append(jax.device_put(last[1], device).block_until_ready())  # copied before the slice goes
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def load_params(directory: str | Path, template: Mapping, *, dtype=None, tied_embedding=None,
                sharding_for: Callable | None = None, transform: Callable | None = None) -> dict:
    """A params tree shaped like ``template`` read from a PyTorch safetensors checkpoint directory,
    each leaf created directly where it lives.

    ``template``: abstract params (``jax.ShapeDtypeStruct`` leaves) in the model's layout, stacked
    layers (``.../stack/...`` [L, ...]) included. ``sharding_for(path, shape)``: the sharding of
    a leaf, or None for a plain device array; with a sharding every device receives only its
    slice (``jax.make_array_from_callback``) and this process reads only its devices' byte
    ranges (:func:`read_leaf`). ``transform(path, array) -> {path: array}`` replaces a leaf
    right after it is made (e.g. quantization), so the float leaves never all exist at once.
    Every source is checked before anything is read: a missing tensor or a wrong shape is a
    UserError on every process before any collective starts.
    """
    import jax

    refs = checkpoint_refs(directory)
    flat = flatten_dict(dict(template))
    sources = {path: _source(refs, path, tuple(spec.shape), tied_embedding) for path, spec in flat.items()}
    out = {}
    for path, spec in flat.items():
        src = sources[path]
        dt = np.dtype(dtype) if dtype is not None else refs[src.keys[0]].dtype
        sharding = sharding_for(path, tuple(spec.shape)) if sharding_for is not None else None
        if sharding is None:
            leaf = jax.device_put(read_leaf(refs, src, None, dt)).block_until_ready()  # one host copy at a time
        else:
            leaf = _put_by_device(tuple(spec.shape), sharding, lambda idx, src=src, dt=dt: read_leaf(refs, src, idx, dt))
        out.update(transform(path, leaf) if transform is not None else {path: leaf})
        del leaf
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
