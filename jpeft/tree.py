"""Paths and targets: the '/'-joined names of a parameter pytree's leaves, and which
kernels a target regex selects (nodes and quantized kernels count as leaves)."""

from __future__ import annotations

import re
from typing import Any, Iterable

import jax
import jax.numpy as jnp

from jpeft.node import is_leaf, is_node

PyTree = Any

#: The Q/K/V projection kernels of :mod:`jpeft.models.phi` and :mod:`jpeft.models.llama` (and of any model that names
#: its attention projections ``q_proj``/``k_proj``/``v_proj``).
DEFAULT_TARGETS = r"(.*/)?(q_proj|k_proj|v_proj)/kernel"


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_str(path) -> str:
    """'/'-joined string of a pytree key path (dict keys, attribute names, indices).

    The trailing ``.value`` of an NNX ``Variable`` is dropped, so ``layers/0/kernel``
    names the same kernel in NNX state as in linen params.
    """
    path = tuple(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return "/".join(_key_name(e) for e in path)


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs, nodes and quantized kernels counted as leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(p), leaf) for p, leaf in flat]


def patterns(targets: str | Iterable[str] | None) -> list[str]:
    """``targets`` as a list of regexes (``None``: :data:`DEFAULT_TARGETS`), TypeError for anything else."""
    if targets is None:
        return [DEFAULT_TARGETS]
    if isinstance(targets, str):
        return [targets]
    regexes = list(targets)
    if not regexes or not all(isinstance(p, str) for p in regexes):
        raise TypeError(f"targets must be a regex or a non-empty list of regexes, got {targets!r}")
    return regexes


def _is_kernel(leaf) -> bool:
    return hasattr(leaf, "shape") and len(leaf.shape) >= 2


def match_targets(params: PyTree, targets: str | Iterable[str] | None = None) -> list[str]:
    """Paths of the leaves of ``params`` that fully match one of the ``targets`` regexes.

    Raises ValueError for a pattern that matches nothing (listing the kernel paths that
    exist) or an already adapted kernel (a node), and TypeError for a matched leaf that
    is not a floating-point array (naming its path, shape and dtype).
    """
    leaves = leaves_with_paths(params)
    chosen: list[str] = []
    for pattern in patterns(targets):
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
        if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(
                f"target {p!r} has dtype {getattr(leaf, 'dtype', type(leaf).__name__)} and shape "
                f"{tuple(getattr(leaf, 'shape', ()))}; only floating-point arrays can be adapted"
            )
    return chosen
