"""QLoRA's frozen base (Dettmers, Pagnoni, Holtzman & Zettlemoyer, "QLoRA: Efficient
Finetuning of Quantized LLMs", NeurIPS 2023): kernels stored in 4 or 8 bits under any method.

:func:`quantize` replaces each targeted kernel of a parameter tree by a
:class:`~jpeft.node.Quantized` leaf (packed codes and per-block absmax scales, the kernels
of :mod:`jpeft.quant`, bit-identical to bitsandbytes); :func:`dequantize` turns them back
into arrays. Everything else composes: ``jpeft.apply`` adapts a quantized kernel with any
method (its frozen ``kernel`` stays the quantized leaf; methods that read the weight at
init, SVD or norms, read it dequantized; a frozen ``residual``, PiSSA's or OLoRA's, is
quantized like it), ``jpeft.linear``/``wrap``/the Phi port dequantize inside
the step, in a remat region so the backward pass dequantizes again instead of keeping a
full-precision copy, ``partition`` keeps quantized leaves frozen, ``materialize`` returns
dequantized base plus update in the kernel's dtype, and ``count_params`` reports
``frozen_bytes``.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import quant
from jpeft.layout import resolve_layout, stack_depth
from jpeft.node import Node, Quantized, quantize_kernel, is_leaf, is_node, is_quantized
from jpeft.tree import leaves_with_paths, match_targets, path_str, patterns

Array = jax.Array
PyTree = Any

#: every kernel but the output head (embeddings are ``embedding`` leaves, not kernels)
DEFAULT_TARGETS = r"(?!(.*/)?lm_head/).*kernel"


def _check(kind, block_size, double_quant) -> None:
    if kind not in quant.KINDS:
        raise ValueError(f"kind must be one of {quant.KINDS}, got {kind!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
    if not isinstance(double_quant, bool):
        raise ValueError(f"double_quant must be True or False, got {double_quant!r}")


def _adapted(path: str, node) -> ValueError:
    return ValueError(f"quantize: {path!r} is adapted ({node.method}); quantize the base first, then jpeft.apply")


def _targets(params: PyTree, targets: str | Iterable[str] | None) -> list[str]:
    leaves = leaves_with_paths(params)
    if targets is not None:
        regexes = patterns(targets)
        for p, x in leaves:  # before match_targets, whose message for nodes is about adapting
            if is_node(x) and any(re.fullmatch(t, p) for t in regexes):
                raise _adapted(p, x)
        return match_targets(params, targets)
    # by default 2-D kernels only: others need a layout to say which axes are stacked layers
    return [p for p, x in leaves if re.fullmatch(DEFAULT_TARGETS, p) and (is_leaf(x) or np.ndim(x) == 2)]


def checked_targets(params: PyTree, kind: str, targets, block_size: int, double_quant: bool,
                    layout) -> dict[str, int]:
    """The paths :func:`quantize` would quantize, each with its number of stacked axes, after
    every check (works on ``ShapeDtypeStruct`` leaves)."""
    _check(kind, block_size, double_quant)
    chosen = _targets(params, targets)
    if not chosen:
        raise ValueError("quantize: no kernel to quantize (default targets: every 2-D kernel but lm_head); pass targets=")
    leaves = dict(leaves_with_paths(params))
    stacks = {}
    for p in chosen:
        leaf = leaves[p]
        if is_node(leaf):
            raise _adapted(p, leaf)
        if is_quantized(leaf):
            raise ValueError(f"quantize: {p!r} is already quantized ({leaf.kind}, block {leaf.block_size})")
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"quantize: {p!r} has dtype {leaf.dtype}; only floating-point kernels are quantized")
        lay = resolve_layout(p, tuple(leaf.shape), layout)
        stacks[p] = stack_depth(lay)
        layer_size = int(np.prod(leaf.shape[stacks[p]:]))
        if layer_size % block_size:
            raise ValueError(f"quantize: block_size={block_size} does not divide the {layer_size} elements of {p!r} "
                             f"(shape {tuple(leaf.shape)}); pick a block size dividing every targeted layer")
    try:
        quant.frozen_bytes(block_size, kind, block_size, double_quant)  # the kernels' own checks (e.g. int8 + double_quant)
    except ValueError as e:
        raise ValueError(f"quantize: {e}") from None

    return stacks


def quantize(params: PyTree, kind: str = "nf4", *, targets: str | Iterable[str] | None = None, block_size: int = 64,
             double_quant: bool | None = None, layout: str | dict[str, str] | None = None) -> PyTree:
    """``params`` with every targeted kernel quantized (a :class:`~jpeft.node.Quantized` leaf).

    Args:
      params: a Flax parameter pytree (linen params or NNX state), not yet adapted.
      kind: ``"nf4"`` (QLoRA's 4-bit NormalFloat), ``"fp4"`` or ``"int8"`` (absmax per block).
      targets: regexes over whole paths as in ``jpeft.apply``; ``None``: every 2-D kernel
        but the output head (``lm_head``) -- embeddings are not kernels.
      block_size: elements per absmax block (64 in QLoRA); must divide each layer's size.
      double_quant: quantize the absmax values to 8 bits per 256 blocks (QLoRA's double
        quantization, bitsandbytes' ``compress_statistics``): 0.127 instead of 0.5 bits per
        parameter of scales at block 64. ``None``: on for the 4-bit kinds, off for ``int8``
        (which has none).
      layout: as in ``jpeft.apply``; only its leading ``s`` (stacked layers) matters: each
        layer of a stacked kernel is quantized on its own, so a ``scan`` slices it.

    Errors (ValueError/TypeError naming the path and the value), before anything is
    quantized: an unknown kind, a block size that does not divide a kernel's layers, an
    adapted (node) or already quantized leaf, an integer kernel.
    """
    if double_quant is None:
        double_quant = kind != "int8"
    stacks = checked_targets(params, kind, targets, block_size, double_quant, layout)

    def convert(path, leaf):
        p = path_str(path)
        if p not in stacks:
            return leaf
        return quantize_kernel(leaf, kind, block_size=block_size, double_quant=double_quant, stack=stacks[p])

    return jax.tree_util.tree_map_with_path(convert, params, is_leaf=is_leaf)


def dequantize(tree: PyTree) -> PyTree:
    """``tree`` with every quantized kernel an array again (of its dtype), in nodes too."""
    def plain(x):
        if is_quantized(x):
            return x.dequantize()
        return dequantized(x) if is_node(x) else x

    return jax.tree_util.tree_map(plain, tree, is_leaf=is_leaf)


# --- quantized kernels inside nodes (a QLoRA base) -------------------------------------

def requantize(like: Quantized, array: Array) -> Quantized:
    """``array`` (of ``like``'s shape and dtype) quantized as ``like`` is."""
    return quantize_kernel(jnp.asarray(array, like.dtype), like.kind, block_size=like.block_size,
                           double_quant=like.double_quant, stack=len(like.stack_shape))


def plain_kernel(kernel: Array | Quantized) -> Array:
    """The kernel as an array (a quantized one dequantized)."""
    return kernel.dequantize() if is_quantized(kernel) else kernel


def quantized_like(kernel: Array | Quantized, frozen: dict) -> dict:
    """A method's frozen arrays for ``kernel``: over a quantized base, the ``residual`` (the
    part of the base an init moved nowhere, PiSSA's/OLoRA's) is quantized like it, as QPiSSA
    does; the other frozen arrays (singular vectors, indices) stay as they are."""
    if not is_quantized(kernel) or "residual" not in frozen:
        return frozen
    return {**frozen, "residual": requantize(kernel, frozen["residual"])}


def holds_quantized(node: Node) -> bool:
    """Whether ``node`` has a quantized frozen array (a QLoRA base)."""
    return any(is_quantized(v) for v in node.frozen.values())


def dequantized(node: Node) -> Node:
    """``node`` with its quantized frozen arrays (a QLoRA base) dequantized."""
    if not holds_quantized(node):
        return node
    return node.replace(frozen={k: v.dequantize() if is_quantized(v) else v for k, v in node.frozen.items()})
