"""Data parallel training over every device of every process, with ``jax.sharding``.

One mesh axis, ``data``, over all devices (all hosts). The batch ``[k, b, T]`` is split along
``b``; the LoRA state is replicated; the frozen weights are replicated, or, with
``shard_frozen=True`` (FSDP/ZeRO-3 style, for models that do not fit one device), split along one
dimension on the same axis (a kernel's output axis when the device count divides it, else the
largest it divides; none: kept whole) and all-gathered by XLA where used. :class:`FrozenPlan`
decides which from the shapes before any weight is read, and the port's loader creates every
leaf directly in its sharding (``flax_lora.models.weights.load_params``): no device and no host
ever holds a full copy. The train step is
the same function (``flax_lora.training.step.make_train_step``) re-jitted with these shardings: XLA
inserts the gradient all-reduce, and the loss stays normalised by the target count of the
*global* batch, so N devices give the update of one device with an N-times larger batch.

Effective batch = per-device batch x accumulation steps x devices.

Several hosts: :func:`init_distributed` calls ``jax.distributed.initialize`` with the
coordinator address, process count and id from its arguments or the environment
(``LORA_COORDINATOR`` ``host:port``, ``LORA_NUM_PROCESSES``, ``LORA_PROCESS_ID``); with none
given it lets JAX auto-detect a cluster (SLURM, Open MPI, Kubernetes, Cloud TPU) and is a
no-op on a single host. Every process then feeds its own slice of the global batch
(:meth:`DataParallel.put_batch` takes the process-local rows).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flax_lora.errors import UserError

DATA = "data"
ENV = ("LORA_COORDINATOR", "LORA_NUM_PROCESSES", "LORA_PROCESS_ID")
_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, local_device_ids=None) -> bool:
    """Join a multi-process run when one is configured; True if ``jax.distributed`` was initialised.

    Arguments win over ``LORA_*`` variables; with neither, a detected cluster (SLURM etc.) is
    joined through JAX's auto-detection. Call before any other JAX use.
    """
    coordinator = coordinator or os.environ.get("LORA_COORDINATOR")
    if num_processes is None and os.environ.get("LORA_NUM_PROCESSES"):
        num_processes = int(os.environ["LORA_NUM_PROCESSES"])
    if process_id is None and os.environ.get("LORA_PROCESS_ID"):
        process_id = int(os.environ["LORA_PROCESS_ID"])
    if coordinator or num_processes or process_id is not None:
        if not (coordinator and num_processes and process_id is not None):
            raise UserError("multi-host needs all of coordinator address, process count and process id "
                            "(--coordinator/--num-processes/--process-id or LORA_COORDINATOR/"
                            "LORA_NUM_PROCESSES/LORA_PROCESS_ID)")
        jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=local_device_ids)
        return True
    if any(k in os.environ for k in _CLUSTER_ENV) and int(os.environ.get("SLURM_NTASKS", "2")) > 1:
        jax.distributed.initialize()  # JAX's cluster auto-detection
        return True
    return False


def _fsdp_spec(shape: tuple[int, ...], n: int, stacked: bool, prefer: int | None = None) -> P:
    """Split dimension ``prefer`` when ``n`` divides it, else the largest dimension divisible by
    ``n`` (never the scanned layer axis); else replicate."""
    dims = [i for i in range(1 if stacked else 0, len(shape)) if shape[i] % n == 0 and shape[i] >= n]
    if n == 1 or not dims:
        return P()
    best = prefer if prefer in dims else max(dims, key=lambda i: shape[i])
    return P(*[DATA if i == best else None for i in range(len(shape))])


# Leaves stored with the output axis last, split along it: the torch weight's rows (one contiguous
# byte range per shard to read), and per-column int8 / NF4 scales stay on the device of their column.
OUTPUT_LAST = ("kernel", "kernel_scale", "kernel_absmax")


def _stacked(path: tuple[str, ...]) -> bool:
    from flax_lora.models.stacking import STACK

    return STACK in path


def _preferred_axis(path: tuple[str, ...], ndim: int) -> int:
    """The axis to split first: a kernel's output axis (the torch weight's axis 0), else the
    first axis (after the layers): the torch tensor's axis 0 too, so every shard is a row range."""
    if path and path[-1] in OUTPUT_LAST:
        return ndim - 1
    return 1 if _stacked(path) else 0


def _keys(tree_path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in tree_path)


@dataclass
class DataParallel:
    """A ``data`` mesh over ``devices`` (default: all devices of all processes) and its shardings."""

    devices: Any = None
    shard_frozen: bool = False

    def __post_init__(self):
        devs = np.asarray(self.devices if self.devices is not None else jax.devices())
        self.mesh = Mesh(devs.reshape(-1), (DATA,))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(None, DATA))  # [k, b, T]: split b

    @property
    def n_devices(self) -> int:
        return self.mesh.size

    def sharding_for(self, path: tuple[str, ...], shape: tuple[int, ...]) -> NamedSharding:
        """The sharding of the frozen leaf at ``path`` (names) of ``shape``: replicated, or with
        ``shard_frozen`` split along one dimension (:func:`_preferred_axis` when the device count
        divides it, else the largest it divides; none: replicated, see :meth:`replicated_leaves`)."""
        if not self.shard_frozen:
            return self.replicated
        spec = _fsdp_spec(tuple(shape), self.n_devices, _stacked(path), _preferred_axis(path, len(shape)))
        return NamedSharding(self.mesh, spec)

    def frozen_shardings(self, frozen):
        """Per-leaf shardings of the frozen params (replicated, or FSDP-split)."""
        return jax.tree_util.tree_map_with_path(lambda p, x: self.sharding_for(_keys(p), tuple(x.shape)), frozen)

    def replicated_leaves(self, frozen) -> list[tuple[str, int]]:
        """(path, bytes) of the leaves ``shard_frozen`` could not split: no dimension (besides the
        layer axis) divisible by the device count. Empty without ``shard_frozen``."""
        if not self.shard_frozen:
            return []
        out = []
        for p, x in jax.tree_util.tree_flatten_with_path(frozen)[0]:
            path, shape = _keys(p), tuple(x.shape)
            if len(shape) > (1 if _stacked(path) else 0) and self.sharding_for(path, shape).spec == P():
                out.append(("/".join(path), int(np.prod(shape)) * np.dtype(x.dtype).itemsize))
        return out

    def put_frozen(self, frozen):
        return _put(frozen, self.frozen_shardings(frozen))

    def put_state(self, state):
        return _put(state, jax.tree_util.tree_map(lambda _: self.replicated, state))

    def put_batch(self, local_batch: dict) -> dict:
        """Global batch arrays from this process's rows ``[k, b_local, T]`` (b_local = b / processes)."""
        out = {}
        for key, x in local_batch.items():
            x = np.asarray(x)
            if x.shape[1] % self.mesh.local_mesh.size:
                raise ValueError(f"batch of {x.shape[1]} rows does not split over {self.mesh.local_mesh.size} local devices")
            out[key] = jax.make_array_from_process_local_data(self.batch_sharding, x)
        return out

    def wrap(self, step, frozen):
        """``step(state, frozen, batch)`` (from make_train_step) jitted for this mesh, state donated."""
        frozen_sh = self.frozen_shardings(frozen)
        return jax.jit(
            step,
            in_shardings=(self.replicated, frozen_sh, self.batch_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=(0,),
        )


MEMORY_ENV = "LORA_DEVICE_MEMORY_GB"  # a device of this many GiB (tests and planning; a CPU reports none)
TOO_BIG_SHARE = 0.5  # frozen weights past this share of a device's memory are split automatically


def device_bytes_limit() -> int | None:
    """One device's memory in bytes: ``LORA_DEVICE_MEMORY_GB`` when set (simulates a device of that
    size), else what the first local device reports (None where it reports nothing, e.g. a CPU)."""
    if os.environ.get(MEMORY_ENV):
        try:
            return int(float(os.environ[MEMORY_ENV]) * 2**30)
        except ValueError:
            raise UserError(f"{MEMORY_ENV}={os.environ[MEMORY_ENV]!r}: expected a number of GiB") from None
    return (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")


def tree_bytes(tree) -> int:
    """Bytes of every leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``)."""
    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def bytes_per_device(tree) -> int:
    """The most bytes of ``tree`` that any one of this process's devices holds (its shards of
    split leaves, whole copies of the others)."""
    per: dict[Any, int] = {}
    for x in jax.tree_util.tree_leaves(tree):
        if not isinstance(x, jax.Array):
            return tree_bytes(tree)  # host arrays: not placed yet
        for shard in x.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return max(per.values(), default=0)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


@dataclass
class FrozenPlan:
    """Where the frozen weights go, decided from their shapes before any is read.

    A loader that takes a ``placement`` (:func:`flax_lora.models.weights.load_params`, through the
    ports' loaders) calls :meth:`decide` with the abstract float params, then creates each leaf
    with :meth:`sharding_for` and passes it through :meth:`transform` (quantization, per leaf).
    Split over the devices (``DataParallel(shard_frozen=True)``) when ``shard`` (--shard-frozen)
    or when a full copy in the run's format would take over :data:`TOO_BIG_SHARE` of one device's
    memory; replicated on several devices otherwise; as plain arrays on one device.
    """

    shard: bool = False  # --shard-frozen
    quantization: str = "none"
    conv1d: tuple[str, ...] = ()  # module paths whose kernel is [out, in] (GPT-2's Conv1D)
    dp: DataParallel | None = None
    auto: bool = False  # split because a full copy would not fit, not because it was asked
    decided: bool = False
    frozen_bytes: int = 0  # a full copy, in the run's format

    def decide(self, params, quantized: bool = False) -> None:
        """Choose the placement for ``params`` (abstract or real; ``quantized``: already in the
        run's format, else priced after quantization without computing it)."""
        from flax_lora.quant import quantize_as

        final = params if quantized else jax.eval_shape(lambda p: quantize_as(p, self.quantization, self.conv1d), params)
        self.frozen_bytes = tree_bytes(final)
        n = jax.device_count()
        limit = device_bytes_limit()
        self.auto = n > 1 and not self.shard and bool(limit) and self.frozen_bytes > TOO_BIG_SHARE * limit
        self.dp = DataParallel(shard_frozen=self.shard or self.auto) if n > 1 else None
        self.decided = True

    def sharding_for(self, path: tuple[str, ...], shape: tuple[int, ...]):
        """A leaf's sharding (None on one device: a plain device array)."""
        return self.dp.sharding_for(path, shape) if self.dp is not None else None

    def transform(self, path: tuple[str, ...], leaf) -> dict:
        """``{path: leaf}``, or the leaf's quantized form in the run's format, placed like the rest."""
        from flax_lora.quant import leaf_quantizer

        quantize = leaf_quantizer(self.quantization, self.sharding_for if self.dp is not None else None, self.conv1d)
        return quantize(path, leaf) if quantize is not None else {path: leaf}

    def place(self, params):
        """Params a loader made whole (one that takes no placement) put where :meth:`decide` said."""
        return self.dp.put_frozen(params) if self.dp is not None else params

    def notes(self, params) -> list[str]:
        """What to tell the user once: an automatic split, and the leaves that stay whole."""
        out = []
        if self.auto:
            out.append(f"the frozen weights ({_mb(self.frozen_bytes)}) take over half of a device's memory "
                       f"({_mb(device_bytes_limit())}): splitting them over the {self.dp.n_devices} devices")
        whole = self.dp.replicated_leaves(params) if self.dp is not None else []
        if whole:
            names = ", ".join(p for p, _ in whole[:3]) + (", ..." if len(whole) > 3 else "")
            out.append(f"{len(whole)} frozen tensor(s) have no dimension divisible by {self.dp.n_devices} devices and "
                       f"stay whole on each ({names}; {_mb(sum(b for _, b in whole))})")
        return out


def _put(tree, shardings):
    """Place a host or single-device tree on the mesh (works across processes: every process
    holds the same full values and contributes its addressable shards). Leaves already placed
    with the wanted sharding are kept as they are."""

    def put(x, sh):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sh, x.ndim):
            return x
        x = np.asarray(x) if not isinstance(x, jax.Array) or not x.is_fully_addressable else x
        if isinstance(x, jax.Array) and jax.process_count() == 1:
            return jax.device_put(x, sh)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

    return jax.tree_util.tree_map(put, tree, shardings)


def to_host(tree):
    """Numpy copy of a replicated (or sharded, single-process) tree, from any process."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))  # replicated: every process has all of it
        return np.asarray(x)

    return jax.tree_util.tree_map(get, tree)


# --- agreement between processes (every function is a no-op returning the local answer on one process)

def is_primary() -> bool:
    """The process that writes the run directory, prints and shows progress (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches ``name``."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def max_over_processes(value: int) -> int:
    """The largest of every process's ``value`` (e.g. a caught signal number, 0 for none)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def from_primary(value: int) -> int:
    """Process 0's ``value`` on every process (a decision only the writer can make)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def agreed(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on every process; if it raised a user error on any, it raises on all.

    Without this a bad input seen by one process (a missing file, a run folder that is not
    empty) would leave the others waiting forever at the next collective.
    """
    try:
        out, err = fn(*args, **kwargs), None
    except UserError as exc:
        out, err = None, exc
    failed = max_over_processes(0 if err is None else jax.process_index() + 1)
    if err is not None:
        raise err
    if failed:
        raise UserError(f"process {failed - 1} of {jax.process_count()} stopped with an error (see its output)")
    return out
