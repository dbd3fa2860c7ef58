"""Many devices, many hosts: a mesh of named axes, FSDP / tensor-parallel shardings of an
adapted tree, batches split over the data axes, multi-host start-up.

A PEFT step differentiates a small adapter against a large frozen base, so the base is
what must be split. The mesh has up to three axes, outermost first (:data:`AXES`):

* ``data``: data parallelism; every row of a batch lives on one ``data`` index.
* ``fsdp``: fully-sharded data parallelism (ZeRO-3 of the frozen base): batches are also
  split along it, and every large frozen array is split along one of its axes, so a device
  holds ``1/fsdp`` of the base; XLA all-gathers a layer's weights where the step uses
  them and frees them after.
* ``tp``: tensor (Megatron) parallelism: the column-parallel kernels (Q, K, V, fc1: the
  output features) and the row-parallel ones (dense, fc2: the input features) are split
  along it, so the attention heads and the MLP's hidden units are computed on ``tp``
  devices each; a batch is replicated along it.

The trainable arrays (adapters) and so the optimizer state are replicated: they are small,
and their gradient's all-reduce is the only communication a data-parallel PEFT step adds.
A method's code is unchanged by any of this: :func:`fsdp_specs` only places arrays, the
step is jitted with those placements, and XLA's SPMD partitioner (GSPMD) computes the
same function (up to the order of floating-point sums) on any mesh.

Multi-host (:func:`initialize`): ``jax.distributed`` joins the processes into one set of
global devices; the mesh spans them all, outermost axis across hosts. Every process runs
the same program on the same data stream; each feeds only its own devices' part of a batch
(:func:`place`), and only process 0 writes files. When a process dies, the others stop
sending it heartbeats and JAX's coordination service terminates them with a message
naming the dead task, after ``heartbeat_timeout`` seconds, instead of hanging.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jpeft.node import Quantized, is_leaf, is_node
from jpeft.tree import path_str

PyTree = Any

#: Mesh axes, outermost (slowest links: across hosts) first.
AXES = ("data", "fsdp", "tp")

#: Tensor-parallel roles by kernel name (the last path component before ``kernel``/``bias``):
#: ``column``-parallel layers split their output features (and their bias), ``row``-parallel
#: ones their input features. The Phi port's names, and the usual names of other decoders.
TP_RULES: tuple[tuple[str, str], ...] = (
    (r"(q_proj|k_proj|v_proj|query|key|value|fc1|gate_proj|up_proj|wi|wi_0|wi_1)$", "column"),
    (r"(dense|o_proj|out_proj|fc2|down_proj|wo)$", "row"),
)


# ---------------------------------------------------------------------------- meshes


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}`` (axes of :data:`AXES`, sizes >= 1)."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in AXES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"mesh {text!r}: each part must be AXIS=SIZE with AXIS one of {', '.join(AXES)} and "
                             f"SIZE a positive integer, got {part!r}")
        if name in sizes:
            raise ValueError(f"mesh {text!r} names axis {name!r} twice")
        sizes[name] = int(value)
    if not sizes:
        raise ValueError(f"mesh {text!r} names no axis; e.g. data=2,fsdp=4")
    return sizes


def make_mesh(axes: str | Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh over ``devices`` (default: every device of every process) with the named axes
    in :data:`AXES` order; ``None`` is data parallelism over all of them. The sizes must
    multiply to the number of devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": len(devices)} if axes is None else parse_mesh(axes) if isinstance(axes, str) else dict(axes)
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the axes are {', '.join(AXES)}")
    names = tuple(a for a in AXES if a in sizes)
    shape = tuple(int(sizes[a]) for a in names)
    if int(np.prod(shape)) != len(devices):
        given = ",".join(f"{a}={s}" for a, s in zip(names, shape))
        raise ValueError(f"mesh {given} has {int(np.prod(shape))} positions but there are {len(devices)} devices; "
                         f"the sizes must multiply to {len(devices)}")
    # jax.devices() lists each process's devices together, so the outer axes cross hosts
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), names, axis_types=(AxisType.Auto,) * len(names))


def auto_axes(mesh: Mesh) -> Mesh:
    """``mesh`` (its devices and axis names) with every axis ``Auto``: jpeft's placements are
    for the SPMD partitioner's propagation, which the models rely on (their gathers and
    einsums name no output sharding). ``jax.make_mesh`` makes ``Explicit`` axes by default
    (jax 0.10); under them the embedding lookup of a table split on its vocabulary by ids
    split on their rows has no unambiguous result sharding. Refused inside
    ``jax.set_mesh`` of a mesh with ``Explicit`` axes, where the traced program requires
    every array to carry those types."""
    context = jax.sharding.get_abstract_mesh()
    if not context.empty and AxisType.Explicit in context.axis_types:
        kinds = ", ".join(f"{a}: {t.name}" for a, t in zip(context.axis_names, context.axis_types))
        raise ValueError(f"jpeft places arrays on Auto mesh axes, but this runs inside jax.set_mesh of a mesh with "
                         f"Explicit axes ({kinds}); call jpeft outside that context, or set a mesh with Auto axes "
                         f"(jpeft.sharding.make_mesh, or jax.make_mesh(shape, names, "
                         f"axis_types=(jax.sharding.AxisType.Auto,) * len(names)))")
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return mesh.update(axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def describe(mesh: Mesh) -> str:
    """``"data=2,fsdp=4"``."""
    return ",".join(f"{a}={s}" for a, s in mesh.shape.items())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(auto_axes(mesh), PartitionSpec())


def data_spec(mesh: Mesh, axes: Sequence[str] = ("data", "fsdp")) -> NamedSharding:
    """Batches: the leading (row) axis split over those of ``axes`` the mesh has (rows are
    replicated along the others, ``tp``)."""
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the axes are {', '.join(AXES)}")
    present = tuple(a for a in axes if a in mesh.axis_names)
    return NamedSharding(auto_axes(mesh), PartitionSpec(present) if present else PartitionSpec())


def batch_divisor(mesh: Mesh | Mapping[str, int], axes: Sequence[str] = ("data", "fsdp")) -> int:
    """How many parts :func:`data_spec` splits a batch's rows into, on ``mesh`` or on a mesh
    of those sizes (:func:`parse_mesh`)."""
    sizes = mesh if isinstance(mesh, Mapping) else mesh.shape
    return int(np.prod([sizes[a] for a in axes if a in sizes]))


# -------------------------------------------------------------------------- placement


def _tp_role(path: str, rules) -> str | None:
    parts = path.split("/")
    # .../fc1/kernel, .../fc1/bias, or a node standing for .../fc1/kernel
    owner = parts[-2] if len(parts) >= 2 and parts[-1] in ("kernel", "bias") else parts[-1]
    return next((role for pattern, role in rules if re.search(pattern, owner)), None)


def _spec(shape: tuple[int, ...], mesh: Mesh, axis: str | None, min_size: int,
          tp_axis: str | None, tp_dim: int | None) -> PartitionSpec:
    dims: list = [None] * len(shape)
    if tp_axis is not None and tp_dim is not None and shape[tp_dim] % mesh.shape[tp_axis] == 0:
        dims[tp_dim] = tp_axis
    if axis is not None and int(np.prod(shape, dtype=np.int64)) >= min_size:
        n = mesh.shape[axis]
        free = [i for i in range(len(shape)) if dims[i] is None and shape[i] % n == 0]
        if free:  # the largest divisible axis (the first of equal ones)
            dims[max(free, key=lambda i: (shape[i], -i))] = axis
    return PartitionSpec(*dims)


def fsdp_specs(tree: PyTree, mesh: Mesh, *, axis: str | None = "fsdp", min_size: int = 2**14,
               tp_axis: str | None = None, tp_rules: Sequence[tuple[str, str]] = TP_RULES) -> PyTree:
    """A tree of ``NamedSharding`` matching ``tree`` (plain parameters, adapted by
    :func:`jpeft.apply`, quantized by :func:`jpeft.quantize`, or a half of
    :func:`jpeft.partition`; ``None`` leaves stay ``None``).

    Every frozen array (a plain leaf, a node's ``frozen`` entry, a quantized kernel's parts)
    of at least ``min_size`` elements is split along ``axis`` on its largest axis whose size
    ``axis`` divides; smaller ones, ones with no divisible axis, and every trainable array
    are replicated. With ``tp_axis``, kernels (plain or a node's base ``kernel``) whose
    layer name matches a column rule of ``tp_rules`` (:data:`TP_RULES`) are split along
    ``tp_axis`` on their output (last) axis, with their bias; row-parallel kernels on their
    input axis (second to last); ``axis`` then takes the largest remaining axis. An axis
    ``tp_axis`` does not divide stays whole. ``axis=None``: no FSDP split. The shardings are
    on ``mesh``'s devices with ``Auto`` axes (:func:`auto_axes`), whatever its axis types.
    """
    mesh = auto_axes(mesh)
    for name, value in (("axis", axis), ("tp_axis", tp_axis)):
        if value is not None and value not in mesh.axis_names:
            raise ValueError(f"{name}={value!r} is not an axis of the mesh ({describe(mesh)})")
    if axis is not None and axis == tp_axis:
        raise ValueError(f"axis and tp_axis must differ, both are {axis!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative integer, got {min_size!r}")
    for rule in tp_rules:
        if len(rule) != 2 or rule[1] not in ("column", "row"):
            raise ValueError(f"tp_rules entries are (regex, 'column' | 'row'), got {rule!r}")
    rep = replicated(mesh)

    def frozen(path: str, x, kernel: bool) -> Any:
        if x is None:
            return None
        if isinstance(x, Quantized):  # packed codes and scales: split by size only
            return x.replace(parts={k: frozen(path, v, False) for k, v in x.parts.items()})
        role = _tp_role(path, tp_rules) if tp_axis is not None else None
        is_bias = path.endswith("/bias")
        tp_dim = None
        if role == "column" and (kernel or is_bias) and len(x.shape) >= 1:
            tp_dim = len(x.shape) - 1
        elif role == "row" and kernel and len(x.shape) >= 2:
            tp_dim = len(x.shape) - 2
        return NamedSharding(mesh, _spec(tuple(x.shape), mesh, axis, min_size, tp_axis, tp_dim))

    def leaf(path, x):
        name = path_str(path)
        if is_node(x):
            return x.replace(trainable={k: None if v is None else rep for k, v in x.trainable.items()},
                             frozen={k: frozen(name, v, k == "kernel") for k, v in x.frozen.items()})
        if x is None:
            return None
        return frozen(name, x, name.endswith("kernel"))

    return jax.tree_util.tree_map_with_path(leaf, tree, is_leaf=lambda x: x is None or is_leaf(x))


def place(tree: PyTree, shardings: PyTree) -> PyTree:
    """Put every array of ``tree`` (host or device arrays, the same on every process) on its
    sharding (a matching tree, or one sharding for all): each process transfers only the
    slices its own devices hold, so nothing is placed whole on one device first."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree_util.tree_map(lambda _: shardings, tree)

    def put(x, sharding):
        if x is None:
            return None
        if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() == 1:
            return jax.device_put(x, sharding)
        host = np.asarray(x)  # once: slicing a device array per shard would compile a slice per shape
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree, shardings, is_leaf=lambda x: x is None)


def host_array(x) -> np.ndarray:
    """``x`` as one NumPy array on this host, also when its shards live on other processes'
    devices (then every process must call this in the same order: it is a collective)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def shard_counts(tree: PyTree) -> list[tuple[str, int, int]]:
    """``(path, elements, largest elements on one device)`` of every array of ``tree``:
    what a device holds of each (used to check that nothing is whole on one device)."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(x, jax.Array):
            per_device = max(int(np.prod(s.data.shape)) for s in x.addressable_shards)
            out.append((path_str(path), int(np.prod(x.shape)), per_device))
    return out


# ------------------------------------------------------------------------- multi-host


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, heartbeat_timeout: int = 60, initialization_timeout: int = 300) -> None:
    """Join this process to a multi-process run (``jax.distributed.initialize``), before any
    other JAX call. Missing arguments come from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. A process that stops sending heartbeats
    for ``heartbeat_timeout`` seconds (it crashed or was killed) makes the others exit with
    an error naming it. On CPU, cross-process collectives go through gloo."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    missing = [n for n, v in (("coordinator", coordinator), ("num_processes", num_processes),
                              ("process_id", process_id)) if v is None]
    if missing:
        raise ValueError(f"a multi-process run needs the coordinator address, the number of processes and this "
                         f"process's id; missing {missing} (give them or set JAX_COORDINATOR_ADDRESS, "
                         f"JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    if ":" not in coordinator:
        raise ValueError(f"coordinator must be HOST:PORT, got {coordinator!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id} "
                         f"(num_processes={num_processes})")
    if heartbeat_timeout < 1:
        raise ValueError(f"heartbeat_timeout must be at least 1 second, got {heartbeat_timeout}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout,
                               initialization_timeout=initialization_timeout)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    if not value.strip().lstrip("-").isdigit():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def is_primary() -> bool:
    """Whether this process writes files (logs, checkpoints' metadata, results): process 0."""
    return jax.process_index() == 0
