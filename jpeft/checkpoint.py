"""Checkpoints: resumable training state (orbax) and small adapter-only exports.

* :class:`Checkpointer` saves the trainable arrays, the optimizer state, the step, the
  RNG and the data position with ``orbax.checkpoint.CheckpointManager`` (atomic
  directories, the last ``keep`` kept), so a run stopped at any point resumes from its
  last checkpoint and continues the same loss trajectory.
* :func:`save_adapter` / :func:`load_adapter` write and read an adapter alone: every
  array of every node except the base kernel it was built from (safetensors) plus a JSON
  description (method, hyper-parameters, shape, dtype per target). The merged model for
  deployment is written by the model's own ``save_pretrained`` after ``jpeft.materialize``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import load_file, save_file

from jpeft import core
from jpeft.node import Node, is_node

PyTree = Any

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def flatten(tree: PyTree) -> dict[str, Any]:
    """``{'/'-joined path: leaf}`` of the non-None leaves of ``tree``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {core.path_str(p): leaf for p, leaf in flat}


def unflatten(template: PyTree, flat: dict[str, Any]) -> PyTree:
    """Put ``flat``'s arrays back into ``template``'s structure (paths must match exactly)."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [core.path_str(p) for p, _ in paths]
    missing, extra = sorted(set(names) - set(flat)), sorted(set(flat) - set(names))
    if missing or extra:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:10]}, unexpected {extra[:10]}")
    return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


class Checkpointer:
    """Training checkpoints in ``directory`` (one sub-directory per saved step)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, extra: dict) -> None:
        """Save ``state`` (a :class:`jpeft.train.TrainState`) and JSON-able ``extra`` (data position, config)."""
        arrays = {"state": flatten(state._asdict())}
        self.manager.save(
            step,
            args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), extra=ocp.args.JsonSave(extra)),
        )
        self.manager.wait_until_finished()

    def restore(self, template_state, step: int | None = None):
        """``(state, extra)`` of ``step`` (default: the latest) shaped like ``template_state``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        abstract = {"state": flatten(template_state._asdict())}
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()),
        )
        fields = unflatten(template_state._asdict(), restored["arrays"]["state"])
        return type(template_state)(**fields), restored["extra"]

    def close(self) -> None:
        self.manager.close()


def _describe(node: Node) -> dict:
    return {
        "method": node.method,
        "hparams": dataclasses.asdict(node.config),
        "shape": list(node.shape),
        "dtype": np.dtype(node.dtype).name,
        "uses_base_kernel": "kernel" in node.frozen,
        "frozen": {k: np.dtype(v.dtype).name for k, v in node.frozen.items() if k != "kernel"},
    }


def save_adapter(directory: str | os.PathLike, adapted: PyTree) -> None:
    """Write the nodes of ``adapted`` without their base kernels (see module docstring)."""
    os.makedirs(directory, exist_ok=True)
    nodes = {p: leaf for p, leaf in core.leaves_with_paths(adapted) if is_node(leaf)}
    if not nodes:
        raise ValueError("save_adapter: the tree holds no jpeft node (was it materialized?)")
    tensors = {}
    for path, node in nodes.items():
        for name, x in node.trainable.items():
            tensors[f"{path}::trainable::{name}"] = np.asarray(x, np.float32)
        for name, x in node.frozen.items():
            if name != "kernel":
                tensors[f"{path}::frozen::{name}"] = np.asarray(jnp.asarray(x, jnp.float32))
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS))
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump({p: _describe(n) for p, n in nodes.items()}, f, indent=2)


def load_adapter(directory: str | os.PathLike, params: PyTree) -> PyTree:
    """Rebuild the adapted tree from ``params`` (the base model) and a saved adapter."""
    with open(os.path.join(directory, ADAPTER_CONFIG)) as f:
        described = json.load(f)
    tensors = load_file(os.path.join(directory, ADAPTER_WEIGHTS))
    leaves = dict(core.leaves_with_paths(params))

    def node_for(path: str, kernel) -> Node:
        d = described[path]
        if list(kernel.shape) != d["shape"]:
            raise ValueError(f"adapter target {path!r} has shape {d['shape']} but the model's kernel is {list(kernel.shape)}")
        config = core.make_config(d["method"], **d["hparams"])
        trainable = {
            k.rsplit("::", 1)[1]: jnp.asarray(v) for k, v in tensors.items() if k.startswith(f"{path}::trainable::")
        }
        frozen = {"kernel": kernel} if d["uses_base_kernel"] else {}
        frozen |= {name: jnp.asarray(tensors[f"{path}::frozen::{name}"], dtype) for name, dtype in d["frozen"].items()}
        return Node(d["method"], config, tuple(d["shape"]), np.dtype(d["dtype"]), trainable, frozen)

    missing = sorted(set(described) - set(leaves))
    if missing:
        raise ValueError(f"adapter targets {missing[:10]} are not in the model; its kernels include {list(leaves)[:10]}")

    def convert(path, leaf):
        p = core.path_str(path)
        return node_for(p, leaf) if p in described else leaf

    return jax.tree_util.tree_map_with_path(convert, params, is_leaf=is_node)
