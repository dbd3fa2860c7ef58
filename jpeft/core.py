"""The functional API: apply, materialize, partition/combine, count_params, linear.

``apply`` walks a parameter pytree, and replaces each kernel whose '/'-joined path
matches a target pattern by a :class:`jpeft.node.Node` of the chosen method; every other
leaf is untouched. All functions here are pure and compose with ``jit``, ``grad``,
``vmap`` and ``jax.eval_shape``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.methods import BUILTIN, Method
from jpeft.node import Node, is_node

Array = jax.Array
PyTree = Any

#: Registry of methods by name; extend it with :func:`register`.
methods: dict[str, Method] = dict(BUILTIN)

#: The Q/K/V projection kernels of :mod:`jpeft.models.phi` (and of any model that names
#: its attention projections ``q_proj``/``k_proj``/``v_proj``).
DEFAULT_TARGETS = r"(.*/)?(q_proj|k_proj|v_proj)/kernel"

PATHS = ("auto", "factored", "materialized")


def register(name: str, method: Method, *, overwrite: bool = False) -> None:
    """Add a user-defined :class:`Method` to :data:`methods` under ``name``."""
    if not isinstance(method, Method):
        raise TypeError(f"register({name!r}, ...) expects a jpeft.Method, got {type(method).__name__}")
    if name in methods and not overwrite:
        raise ValueError(f"a method named {name!r} is already registered (pass overwrite=True to replace it)")
    methods[name] = method


def get_method(name: str) -> Method:
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(methods))}")
    return methods[name]


def make_config(method: str, **hparams) -> Any:
    """The validated config dataclass of ``method`` (TypeError on an unknown hyper-parameter)."""
    cls = get_method(method).config
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(hparams) - set(known))
    if unknown:
        raise TypeError(f"method {method!r} got unknown hyper-parameter(s) {unknown}; valid: {known}")
    # NumPy scalars (np.int64(4), np.float32(16)) become the Python values configs hold and hash
    return cls(**{k: v.item() if isinstance(v, np.generic) else v for k, v in hparams.items()})


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_str(path) -> str:
    """'/'-joined string of a pytree key path (dict keys, attribute names, indices)."""
    return "/".join(_key_name(e) for e in path)


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs, nodes counted as leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)
    return [(path_str(p), leaf) for p, leaf in flat]


def _patterns(targets: str | Iterable[str] | None) -> list[str]:
    if targets is None:
        return [DEFAULT_TARGETS]
    if isinstance(targets, str):
        return [targets]
    patterns = list(targets)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"targets must be a regex or a non-empty list of regexes, got {targets!r}")
    return patterns


def _is_kernel(leaf) -> bool:
    return hasattr(leaf, "shape") and len(leaf.shape) == 2


def match_targets(params: PyTree, targets: str | Iterable[str] | None = None) -> list[str]:
    """Paths of the leaves of ``params`` that fully match one of the ``targets`` regexes.

    Raises ValueError for a pattern that matches nothing (listing the 2-D kernel paths
    that exist) or an already adapted kernel (a node), and for a matched leaf that is not a
    2-D floating-point array (naming its path, shape and dtype).
    """
    leaves = leaves_with_paths(params)
    chosen: list[str] = []
    for pattern in _patterns(targets):
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"target {pattern!r} is not a valid regex: {e}") from None
        adapted = [f"{p} ({leaf.method})" for p, leaf in leaves if is_node(leaf) and regex.fullmatch(p)]
        if adapted:
            raise ValueError(
                f"target {pattern!r} matches kernels that are already adapted: {adapted[:10]}"
                f"{' ...' if len(adapted) > 10 else ''}. Adapt the original parameters, or "
                "jpeft.materialize the tree first to adapt the merged weights."
            )
        hits = [p for p, leaf in leaves if regex.fullmatch(p)]
        if not hits:
            kernels = [p for p, leaf in leaves if not is_node(leaf) and _is_kernel(leaf)]
            raise ValueError(
                f"target {pattern!r} matches no parameter (patterns must match the whole path). "
                f"Kernel paths: {kernels[:50]}{' ...' if len(kernels) > 50 else ''}"
            )
        chosen += [p for p in hits if p not in chosen]
    by_path = dict(leaves)
    for p in chosen:
        leaf = by_path[p]
        if not _is_kernel(leaf):
            raise ValueError(f"target {p!r} has shape {tuple(getattr(leaf, 'shape', ()))}; only 2-D kernels can be adapted")
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"target {p!r} has dtype {leaf.dtype}; only floating-point kernels can be adapted")
    return chosen


def apply(params: PyTree, method: str, *, key: Array, targets: str | Iterable[str] | None = None, **hparams) -> PyTree:
    """Replace every targeted kernel of ``params`` by a node of ``method``.

    Args:
      params: a Flax parameter pytree (kernels are (in, out), ``y = x @ K``).
      method: a name in :data:`methods` (``lora``, ``dora``, ``lokr``, ``oft``, ``boft``,
        ``shoft``, ``rhoft`` or a registered one).
      key: a ``jax.random`` key; target ``i`` (in tree order) uses ``fold_in(key, i)``.
      targets: a regex or a list of regexes matched against whole '/'-joined paths;
        ``None`` selects the Q/K/V projections (:data:`DEFAULT_TARGETS`).
      **hparams: the method's hyper-parameters (see its config dataclass).

    Returns:
      A pytree of the same structure with :class:`Node` leaves at the targets. All
      validation happens here, before any array is touched.
    """
    spec = get_method(method)
    config = make_config(method, **hparams)
    chosen = match_targets(params, targets)
    shapes = dict(leaves_with_paths(params))
    for p in chosen:
        try:
            config.check(tuple(shapes[p].shape))
        except ValueError as e:
            raise ValueError(f"{method} cannot adapt {p!r}: {e}") from None
    order = {p: i for i, p in enumerate(chosen)}

    def convert(path, leaf):
        p = path_str(path)
        if p not in order:
            return leaf
        trainable, frozen = spec.init(jax.random.fold_in(key, order[p]), leaf, config)
        return Node(method, config, tuple(leaf.shape), np.dtype(leaf.dtype), trainable, frozen)

    return jax.tree_util.tree_map_with_path(convert, params, is_leaf=is_node)


def materialize(adapted: PyTree) -> PyTree:
    """Plain kernels again: each node becomes ``W'`` in the dtype of the kernel it replaced."""

    def merge(leaf):
        if not is_node(leaf):
            return leaf
        return get_method(leaf.method).materialize(leaf).astype(leaf.dtype)

    return jax.tree_util.tree_map(merge, adapted, is_leaf=is_node)


def _none_like(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda _: None, tree)


def partition(adapted: PyTree) -> tuple[PyTree, PyTree]:
    """Split into ``(trainable, frozen)``: two trees of the same structure, each with
    ``None`` where the other has an array (equinox's ``partition``).

    Differentiate only ``trainable`` and give only it to the optimizer; rebuild the
    model's parameters with :func:`combine`.
    """

    def split(leaf, take_trainable: bool):
        if is_node(leaf):
            if take_trainable:
                return leaf.replace(frozen=_none_like(leaf.frozen))
            return leaf.replace(trainable=_none_like(leaf.trainable))
        return None if take_trainable else leaf

    trainable = jax.tree_util.tree_map(lambda l: split(l, True), adapted, is_leaf=is_node)
    frozen = jax.tree_util.tree_map(lambda l: split(l, False), adapted, is_leaf=is_node)
    return trainable, frozen


def _describe(leaf) -> str:
    if leaf is None:
        return "None"
    if is_node(leaf):
        return f"a {leaf.method} node of shape {leaf.shape} ({leaf.config})"
    return f"an array of shape {tuple(getattr(leaf, 'shape', ()))}"


def _first_mismatch(trainable: PyTree, frozen: PyTree) -> str | None:
    """Where two trees that :func:`combine` should join first differ (nodes compared by
    method, config and shape), or ``None``."""
    def flat(tree):
        leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None or is_node(x))
        return [(path_str(p), x) for p, x in leaves]

    a, b = flat(trainable), flat(frozen)
    for (pa, xa), (pb, xb) in zip(a, b):
        if pa != pb:
            return f"at {pa!r} in trainable against {pb!r} in frozen (different keys)"
        same_node = is_node(xa) and is_node(xb) and (xa.method, xa.config, xa.shape) == (xb.method, xb.config, xb.shape)
        if (is_node(xa) or is_node(xb)) and not same_node:
            return f"at {pa!r}: {_describe(xa)} in trainable, {_describe(xb)} in frozen"
    if len(a) != len(b):
        longer, name = (a, "trainable") if len(a) > len(b) else (b, "frozen")
        return f"at {longer[min(len(a), len(b))][0]!r}, which only {name} has"
    return None


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
    """Inverse of :func:`partition`: take every non-``None`` leaf of either tree.

    Trees that are not two halves of one :func:`partition` are refused, naming the first
    path where they differ (different keys, nodes of another method or config, a leaf
    that both or neither tree holds).
    """
    hint = "combine takes the two halves that jpeft.partition returned for one tree"
    problem = _first_mismatch(trainable, frozen)
    if problem:
        raise ValueError(f"combine: the trainable and frozen trees differ {problem}; {hint}")

    def take(path, a, b):
        if (a is None) == (b is None):
            which = "neither tree has" if a is None else "both trees have"
            raise ValueError(f"combine: {which} an array at {path_str(path)!r}; {hint}")
        return b if a is None else a

    return jax.tree_util.tree_map_with_path(take, trainable, frozen, is_leaf=lambda x: x is None)


def _size(x) -> int:
    return int(math.prod(x.shape)) if hasattr(x, "shape") else 0


def count_params(adapted: PyTree) -> dict:
    """Parameter counts: ``trainable``, ``frozen``, ``total`` and one row per target.

    Works on ``jax.ShapeDtypeStruct`` leaves, so ``jax.eval_shape(lambda p: apply(p, ...),
    shapes)`` counts a full-size model without allocating it.
    """
    rows = {}
    frozen_total = 0
    for p, leaf in leaves_with_paths(adapted):
        if is_node(leaf):
            t = sum(_size(x) for x in jax.tree_util.tree_leaves(leaf.trainable))
            f = sum(_size(x) for x in jax.tree_util.tree_leaves(leaf.frozen))
            rows[p] = {"method": leaf.method, "shape": leaf.shape, "trainable": t, "frozen": f}
            frozen_total += f
        else:
            frozen_total += _size(leaf)
    trainable_total = sum(r["trainable"] for r in rows.values())
    return {
        "trainable": trainable_total,
        "frozen": frozen_total,
        "total": trainable_total + frozen_total,
        "targets": rows,
    }


def uses_dropout(kernel: Any) -> bool:
    """Whether ``kernel`` is a node whose method applies dropout in training."""
    return is_node(kernel) and getattr(kernel.config, "dropout", 0) > 0


def linear(x: Array, kernel: Array | Node, *, dropout_key: Array | None = None, path: str = "auto") -> Array:
    """``x @ W'`` for a plain kernel or a node, in the dtype of ``x``.

    For a node, ``path="auto"`` asks the method's cost model (``Method.flops``) whether
    the factored or the materialized form is cheaper for ``x``'s number of rows;
    ``"factored"`` and ``"materialized"`` force one. ``dropout_key`` enables the method's
    training-time dropout (factored path only).
    """
    if not is_node(kernel):
        return x @ kernel.astype(x.dtype)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    spec = get_method(kernel.method)
    if path == "auto":
        tokens = math.prod(x.shape[:-1])
        factored_cost, materialized_cost = spec.flops(kernel, tokens)
        dropping = dropout_key is not None and uses_dropout(kernel)
        path = "factored" if dropping or factored_cost <= materialized_cost else "materialized"
    if path == "factored":
        return spec.factored(x, kernel, dropout_key)
    return x @ spec.materialize(kernel).astype(x.dtype)
