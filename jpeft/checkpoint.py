"""Checkpoints: resumable training state (orbax) and small adapter-only exports.

* :class:`Checkpointer` saves the trainable arrays, the optimizer state, the step, the
  RNG and the data position with ``orbax.checkpoint.CheckpointManager`` (atomic
  directories, the last ``keep`` kept), so a run stopped at any point resumes from its
  last checkpoint and continues the same loss trajectory.
* :func:`save_adapter` / :func:`load_adapter` write and read an adapter alone
  (safetensors, float32; integer arrays in their own dtype) plus a JSON description per
  target (method, hyper-parameters, matrix shape, kernel shape and layout, dtype). An
  adapter holds the trainable arrays and only the frozen arrays the base cannot rebuild.
  A method with a ``frozen_from_base`` (:class:`jpeft.methods.base.Method`) gets its
  frozen arrays back from the base kernel on loading, so its adapter stores none of them
  but their vectors: never the base kernel (LoRA, DoRA, LoKr, OFT, BOFT, HRA), and for
  SHOFT (and SVFT, LoRA-XS) not ``u``, ``v`` (twice a square base) but the base's singular
  values, which loading compares with the rebuilt ones to refuse an adapter loaded onto
  another base. Vectors ``frozen_from_base`` does not produce are stored and loaded as
  they are: SVFT's key-drawn (``random``) or trained-on (``top_k``) coefficient positions,
  integer arrays restored exactly. RHOFT's frozen ``u``, ``v`` come from a randomized SVD
  that depends on the key, so they are stored (as many numbers as the base at the default
  rank).
* Dtypes follow the base an adapter is loaded onto: a node takes the dtype of the kernel
  it replaces, and so do the frozen arrays that were in the kernel's dtype when saved,
  so an adapter trained on a float32 base and loaded onto the bf16 model materializes
  bf16 kernels. Trainable arrays are float32 whatever the base.
* Adapters written before frozen arrays were rebuilt (a ``uses_base_kernel`` flag, SHOFT
  with its ``u``, ``v`` stored) still load, their stored arrays used as they are.

The merged model for deployment is written by the model's own ``save_pretrained`` after
``jpeft.materialize``.
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

from jpeft import hooks, sharding
from jpeft.layout import per_layer
from jpeft.methods.registry import get_method, make_config
from jpeft.node import Node, is_leaf, is_node
from jpeft.quantized import plain_kernel, quantized_like
from jpeft.tree import leaves_with_paths, path_str

PyTree = Any

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def flatten(tree: PyTree) -> dict[str, Any]:
    """``{'/'-joined path: leaf}`` of the non-None leaves of ``tree``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(p): leaf for p, leaf in flat}


def unflatten(template: PyTree, flat: dict[str, Any]) -> PyTree:
    """Put ``flat``'s arrays back into ``template``'s structure (paths must match exactly)."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [path_str(p) for p, _ in paths]
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


#: Tolerance of the base check: the largest difference between a rebuilt frozen vector
#: (SHOFT's singular values) and the saved one, relative to the saved vector's largest
#: entry. By Weyl's inequality a perturbation ``E`` of the kernel moves every singular
#: value by at most ``||E||_2``, so the difference is bounded relative to the largest one;
#: an entry-wise relative test would refuse a mere bf16 cast of the base, whose smallest
#: singular values move by 18% on a random 1024 x 1024 kernel (4% at 512) while the
#: largest difference stays at 1e-4 of the largest value. The float32 rounding of a
#: float64 SVD of the same base is ~1e-7; a base in a coarser dtype, at saving or at
#: loading, is allowed 4 of its epsilons (0.031 for bf16). The check identifies a base by
#: its spectrum: it refuses another layer or model whose singular values differ by more
#: than that, not a kernel with nearly the same spectrum (two random initializations of
#: one shape differ by 1e-2 at 512 x 512: refused in float32, not in bf16).
BASE_CHECK_RTOL = 1e-4


def _base_check_rtol(*dtypes) -> float:
    return max([BASE_CHECK_RTOL] + [4 * float(jnp.finfo(d).eps) for d in dtypes])


def _relative_mismatch(saved, rebuilt, depth: int) -> float:
    """``max |rebuilt - saved| / max |saved|`` of each layer's vector, the worst layer."""
    saved, rebuilt = np.asarray(saved, np.float64), np.asarray(rebuilt, np.float64)
    axes = tuple(range(depth, saved.ndim))
    scale = np.maximum(np.max(np.abs(saved), axis=axes), np.finfo(np.float32).tiny)
    return float(np.max(np.max(np.abs(rebuilt - saved), axis=axes) / scale))


def _stored_frozen(node: Node) -> dict[str, Any]:
    """The frozen arrays an adapter must hold: not the base kernel, and, where the method
    rebuilds its frozen arrays from the base, only their vectors (the base check)."""
    depth = len(node.stack_shape)
    rebuildable = get_method(node.method).frozen_from_base is not None
    return {k: v for k, v in node.frozen.items() if k != "kernel" and (not rebuildable or v.ndim - depth <= 1)}


def _rebuilt_frozen(path: str, d: dict, spec, config, base, layout: str, stored: dict) -> dict:
    """The frozen arrays (but the base ``kernel``) that ``spec.frozen_from_base`` rebuilds
    from ``base``, layer by layer, after checking the stored vectors among them against them
    (stored vectors it does not rebuild are the caller's, loaded as stored).

    The names come from an abstract evaluation first, so a method that keeps only the
    base kernel (LoRA) computes and copies nothing here."""
    shape = tuple(d["shape"])
    names = set(jax.eval_shape(lambda k: spec.frozen_from_base(k, config), jax.ShapeDtypeStruct(shape, base.dtype))) - {"kernel"}
    if not names:
        return {}
    rebuilt = per_layer(
        lambda i, matrix: {k: v for k, v in spec.frozen_from_base(matrix, config).items() if k in names},
        plain_kernel(base), layout
    )
    depth = len(layout) - len(layout.lstrip("s"))
    rtol = _base_check_rtol(base.dtype, d["dtype"])
    for name, saved in ((k, v) for k, v in stored.items() if k in names):
        err = _relative_mismatch(saved, rebuilt[name], depth)
        if not err <= rtol:
            raise ValueError(
                f"adapter target {path!r} was trained on another base: its {name} rebuilt from this model's "
                f"kernel ({np.dtype(base.dtype).name}) differs from the saved one by {err:.3g} of its largest entry, "
                f"more than the tolerance {rtol:g} (saved {np.asarray(saved).ravel()[:4].tolist()}..., "
                f"rebuilt {np.asarray(rebuilt[name], np.float32).ravel()[:4].tolist()}...)"
            )
    return quantized_like(base, rebuilt)


def _describe(node: Node) -> dict:
    return {
        "method": node.method,
        "hparams": dataclasses.asdict(node.config),
        "shape": list(node.shape),
        "kernel_shape": list(node.kernel_shape),
        "layout": node.layout,
        "dtype": np.dtype(node.dtype).name,
        "uses_base_kernel": "kernel" in node.frozen,
        # frozen arrays in the kernel's dtype follow the base's dtype on loading
        "frozen": {k: np.dtype(v.dtype).name for k, v in _stored_frozen(node).items()},
        "frozen_in_kernel_dtype": sorted(k for k, v in node.frozen.items() if k != "kernel" and v.dtype == node.dtype),
    }


def save_adapter(directory: str | os.PathLike, adapted: PyTree) -> None:
    """Write the nodes of ``adapted`` without what the base rebuilds (see module docstring).

    Arrays split over several processes' devices are gathered (every process must call
    this, in the same order); process 0 alone writes."""
    nodes = {p: leaf for p, leaf in leaves_with_paths(adapted) if is_node(leaf)}
    if not nodes:
        raise ValueError("save_adapter: the tree holds no jpeft node (was it materialized?)")
    tensors = {}
    for path, node in nodes.items():
        for name, x in node.trainable.items():
            tensors[f"{path}::trainable::{name}"] = sharding.host_array(x).astype(np.float32)
        for name, x in _stored_frozen(node).items():
            keep = jnp.issubdtype(x.dtype, jnp.integer)  # index patterns round-trip exactly
            host = sharding.host_array(x)
            tensors[f"{path}::frozen::{name}"] = host if keep else host.astype(np.float32)
    if not sharding.is_primary():
        return
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS))
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump({p: _describe(n) for p, n in nodes.items()}, f, indent=2)


def read_adapter_files(directory: str | os.PathLike, config_name: str, weights_name: str) -> tuple[str, dict, str, dict]:
    """``(config_path, config, weights_path, tensors)`` of an adapter directory (jpeft's or
    PEFT's): a JSON object and a safetensors file, or a ValueError naming the file."""
    config_path, weights_path = os.path.join(directory, config_name), os.path.join(directory, weights_name)
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: not a readable adapter config ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not a JSON object")
    try:
        tensors = load_file(weights_path)
    except Exception as e:  # safetensors raises its own error types on a damaged file
        raise ValueError(f"{weights_path}: not a readable safetensors file ({e})") from None
    return config_path, config, weights_path, tensors


def _hook_node(path: str, d: dict, tensors: dict, model: Any, params: PyTree) -> Node:
    """The node of a method that adds computation (``params["jpeft"][method]``), all of its
    arrays stored; with ``model``, checked against the arrays its ``init`` makes for it."""
    config = make_config(d["method"], **d["hparams"])
    saved = lambda kind: {k.rsplit("::", 1)[1]: jnp.asarray(v) for k, v in tensors.items() if k.startswith(f"{path}::{kind}::")}
    trainable, frozen = saved("trainable"), saved("frozen")
    if model is not None:
        dims = hooks.dims_of(model)
        try:
            config.check(dims)
        except ValueError as e:
            raise ValueError(f"adapter {path!r} does not fit the model: {e}") from None
        want = jax.eval_shape(lambda p: get_method(d["method"]).init(jax.random.key(0), dims, config, p), params)
        for kind, got, expected in (("trainable", trainable, want[0]), ("frozen", frozen, want[1])):
            found = {k: tuple(v.shape) for k, v in got.items()}
            shapes = {k: tuple(v.shape) for k, v in expected.items()}
            if found != shapes:
                raise ValueError(f"adapter {path!r} ({d['method']}) holds {kind} arrays {found}; this model needs {shapes}")
    return Node(d["method"], config, (), np.dtype(d["dtype"]), trainable, frozen, layout="", kernel_shape=())


def load_adapter(directory: str | os.PathLike, params: PyTree, model: Any = None) -> PyTree:
    """Rebuild the adapted tree from ``params`` (the base model) and a saved adapter.

    Nodes take the dtype of the base leaves they are loaded onto; frozen arrays the base
    rebuilds are recomputed from it and checked against the saved vectors. The nodes of
    methods that add computation (``params["jpeft"]``) are loaded as stored; ``model`` (one
    with ``jpeft_dims()``, or its :class:`jpeft.hooks.ModelDims`) checks that they fit it.
    """
    _, described, _, tensors = read_adapter_files(directory, ADAPTER_CONFIG, ADAPTER_WEIGHTS)
    added = {p: d for p, d in described.items() if p.startswith(f"{hooks.KEY}/")}
    described = {p: d for p, d in described.items() if p not in added}
    present = set(hooks.split(params)[1])
    clash = sorted(p for p in added if p.split("/", 1)[1] in present)
    if clash:
        raise ValueError(f"adapter {clash} is already in the parameters")
    hook_nodes = {p.split("/", 1)[1]: _hook_node(p, d, tensors, model, params) for p, d in added.items()}
    leaves = dict(leaves_with_paths(params))

    def node_for(path: str, base) -> Node:
        d = described[path]
        kernel_shape = d.get("kernel_shape", d["shape"])
        if list(base.shape) != kernel_shape:
            raise ValueError(f"adapter target {path!r} has shape {kernel_shape} but the model's leaf is {list(base.shape)}")
        spec = get_method(d["method"])
        config = make_config(d["method"], **d["hparams"])
        layout, dtype = d.get("layout", "io"), np.dtype(base.dtype)
        depth = len(layout) - len(layout.lstrip("s"))
        saved = lambda kind: {k.rsplit("::", 1)[1]: jnp.asarray(v) for k, v in tensors.items() if k.startswith(f"{path}::{kind}::")}
        trainable, stored = saved("trainable"), saved("frozen")
        in_kernel_dtype = set(d.get("frozen_in_kernel_dtype", ()))
        as_stored = {k: v.astype(dtype if k in in_kernel_dtype else d["frozen"][k]) for k, v in stored.items()}
        # an adapter written before SHOFT's u, v were rebuilt stores them: use them as stored
        if spec.frozen_from_base is not None and all(x.ndim - depth <= 1 for x in stored.values()):
            rebuilt = _rebuilt_frozen(path, d, spec, config, base, layout, stored)
            frozen = {**{k: v for k, v in as_stored.items() if k not in rebuilt}, **rebuilt}
        else:
            frozen = as_stored
        if d["uses_base_kernel"]:
            frozen = {"kernel": base, **frozen}
        return Node(method=d["method"], config=config, shape=tuple(d["shape"]), dtype=dtype, trainable=trainable,
                    frozen=frozen, layout=layout, kernel_shape=tuple(kernel_shape))

    missing = sorted(set(described) - set(leaves))
    if missing:
        raise ValueError(f"adapter targets {missing[:10]} are not in the model; its kernels include {list(leaves)[:10]}")

    def convert(path, leaf):
        p = path_str(path)
        return node_for(p, leaf) if p in described else leaf

    loaded = jax.tree_util.tree_map_with_path(convert, params, is_leaf=is_leaf)
    if hook_nodes:
        loaded = {**loaded, hooks.KEY: {**hooks.split(loaded)[1], **hook_nodes}}
    return loaded
