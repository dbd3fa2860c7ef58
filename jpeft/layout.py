"""Kernel layouts: how a kernel's axes form the (in, out) matrix its layer computes,
one letter per axis (``i`` input, ``o`` output, ``s`` a leading stacked axis), and the
moves between a kernel and that matrix."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.node import Node

Array = jax.Array


LAYOUT_HELP = (
    "one letter per kernel axis: 'i' input, 'o' output, 's' a leading stacked axis; e.g. 'io' for "
    "Dense (in, out), 'ioo' for DenseGeneral/attention q/k/v (in, heads, head_dim), 'iio' for the "
    "attention output (heads, head_dim, out), 'sio' for Dense layers stacked by nn.scan (L, in, out)"
)


def check_layout(path: str, shape: tuple[int, ...], layout: str) -> None:
    """Raise ValueError unless ``layout`` describes a kernel of ``shape``."""
    stacked = stack_depth(layout) if isinstance(layout, str) else 0
    problem = None
    if not isinstance(layout, str) or set(layout) - set("ios"):
        problem = "it may only use the letters i, o and s"
    elif len(layout) != len(shape):
        problem = f"it has {len(layout)} letters for {len(shape)} axes"
    elif "s" in layout[stacked:]:
        problem = "stacked axes 's' must come first"
    elif "i" not in layout or "o" not in layout:
        problem = "it needs at least one 'i' and one 'o' axis"
    if problem:
        raise ValueError(f"layout {layout!r} does not fit {path!r} of shape {tuple(shape)}: {problem}. Layout: {LAYOUT_HELP}")


def resolve_layout(path: str, shape: tuple[int, ...], layout: str | dict[str, str] | None) -> str:
    """The layout of target ``path``: ``layout`` itself, or the value of the first pattern of
    a ``{regex: layout}`` dict that fully matches ``path``; 2-D kernels default to ``"io"``."""
    chosen = layout
    if isinstance(layout, dict):
        chosen = next((v for pattern, v in layout.items() if re.fullmatch(pattern, path)), None)
    elif layout is not None and not isinstance(layout, str):
        raise TypeError(f"layout must be a string or a dict from target regex to string, got {layout!r}")
    if chosen is None:
        if len(shape) != 2:
            raise ValueError(
                f"target {path!r} has shape {tuple(shape)}: a kernel that is not 2-D needs a layout "
                f"(apply(..., layout='ioo') or layout={{pattern: layout}}). Layout: {LAYOUT_HELP}"
            )
        chosen = "io"
    check_layout(path, shape, chosen)
    return chosen


def matrix_shape(kernel_shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    """``(in, out)`` of one layer: the products of the ``i`` and the ``o`` axis sizes."""
    n = math.prod(d for d, c in zip(kernel_shape, layout) if c == "i")
    m = math.prod(d for d, c in zip(kernel_shape, layout) if c == "o")
    return n, m


def _io_order(layout: str) -> list[int]:
    return [a for a, c in enumerate(layout) if c == "i"] + [a for a, c in enumerate(layout) if c == "o"]


def to_matrix(kernel: Array, layout: str) -> Array:
    """One layer's kernel (layout without ``s``) as its (in, out) matrix; free when the
    ``i`` axes precede the ``o`` axes (a reshape), a transpose otherwise."""
    if layout in ("io", ""):
        return kernel
    n, m = matrix_shape(kernel.shape, layout)
    order = _io_order(layout)
    if order != sorted(order):
        kernel = jnp.transpose(kernel, order)
    return kernel.reshape(n, m)


def from_matrix(w: Array, layout: str, kernel_shape: tuple[int, ...]) -> Array:
    """Inverse of :func:`to_matrix`: an (in, out) matrix in the kernel's own layout."""
    if layout == "io" or not layout:
        return w
    order = _io_order(layout)
    w = w.reshape([kernel_shape[a] for a in order])
    return w if order == sorted(order) else jnp.transpose(w, np.argsort(order))


def stack_depth(layout: str) -> int:
    """The number of leading stacked (``s``) axes of a layout."""
    return len(layout) - len(layout.lstrip("s"))


def layer_meta(node: Node, depth: int = 1) -> Node:
    """``node`` with its first ``depth`` stacked axes removed from its static description
    (for the slices a scan or vmap over the stack sees)."""
    return node.replace(layout=node.layout[depth:], kernel_shape=node.kernel_shape[depth:])


def per_layer(fn, kernel: Array, layout: str):
    """``fn(index, matrix)`` for every layer of ``kernel`` (one call if it is not stacked),
    its results (pytrees of arrays) stacked back along the leading stacked axes. Layers
    run one by one: a ``vmap`` would batch the LAPACK calls of SVD-based inits, which can
    deadlock on CPU."""
    depth = stack_depth(layout)
    stack = tuple(kernel.shape[:depth])
    results = [fn(i, to_matrix(kernel[index], layout[depth:])) for i, index in enumerate(np.ndindex(*stack))]
    if not depth:
        return results[0]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs).reshape(stack + xs[0].shape), *results)
