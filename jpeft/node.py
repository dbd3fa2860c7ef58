"""The pytree node that replaces an adapted kernel.

A :class:`Node` holds one reparametrized weight: the name of its method, the method's
static configuration, its trainable arrays and its frozen arrays. It is a registered
pytree whose leaves are exactly those arrays, so ``jit``, ``grad``, ``vmap`` and optax
see through it, while ``method``, ``config`` and the kernel ``shape`` stay static.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jpeft import quant

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Node:
    """A reparametrized kernel: the matrix ``W'`` of shape ``shape`` = (in, out), ``y = x @ W'``.

    A kernel that is not 2-D is adapted as the matrix its layer computes: ``layout`` has
    one letter per axis of ``kernel_shape``, ``i`` an input axis, ``o`` an output axis,
    ``s`` a leading stacked axis (layers stacked by ``nn.scan``/``nnx.scan``/``vmap``);
    ``in`` is the product of the ``i`` sizes and ``out`` that of the ``o`` sizes. A
    stacked node holds one adapter per index: each of its arrays has the stacked axes in
    front. A frozen entry named ``kernel`` is the base kernel exactly as the model stores
    it (any layout, stacked or not, never copied); method code sees it as an (in, out)
    matrix through :func:`jpeft.core.matrix_view`.

    Attributes:
      method: registry name of the method (``jpeft.methods[method]``).
      config: the method's frozen, hashable hyper-parameter dataclass.
      shape: ``(in, out)`` of the matrix this node stands for (one layer of a stack).
      dtype: dtype of the kernel it replaced (what ``materialize`` returns).
      trainable: dict of arrays updated by the optimizer.
      frozen: dict of arrays kept fixed (e.g. the base kernel, singular vectors).
      layout: one letter per kernel axis (``"io"`` for a plain 2-D kernel).
      kernel_shape: shape of the kernel as the model stores it (``None``: ``shape``).
    """

    method: str
    config: Any
    shape: tuple[int, ...]
    dtype: Any
    trainable: dict[str, Array]
    frozen: dict[str, Array]
    layout: str = "io"
    kernel_shape: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.kernel_shape is None:
            object.__setattr__(self, "kernel_shape", tuple(self.shape))

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Sizes of the leading stacked axes (``()`` for a single layer)."""
        return tuple(self.kernel_shape[: len(self.layout) - len(self.layout.lstrip("s"))])

    def replace(self, **changes: Any) -> "Node":
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    Node,
    data_fields=["trainable", "frozen"],
    meta_fields=["method", "config", "shape", "dtype", "layout", "kernel_shape"],
)


def is_node(x: Any) -> bool:
    return isinstance(x, Node)


@dataclasses.dataclass(frozen=True)
class Quantized:
    """A frozen kernel stored quantized (QLoRA's 4-bit NormalFloat, FP4 or int8; see
    :mod:`jpeft.quant`): packed codes and per-block scales in ``parts``, dequantized on use.

    Each layer of a stacked kernel (``stack`` leading axes, layers stacked by ``nn.scan``)
    is quantized on its own, so the parts carry the stacked axes in front and a ``scan``
    or ``vmap`` slices them like any array. ``shape`` and ``ndim`` describe the kernel the
    parts stand for now (a sliced stack has fewer leading axes); ``dtype`` is what it
    dequantizes to.

    Attributes:
      parts: dict of arrays (``codes`` and the scales of :func:`jpeft.quant.quantize_blocks`),
        each with the stacked axes in front of the flat per-layer array.
      kind: ``"nf4"``, ``"fp4"`` or ``"int8"``.
      layer_shape: the shape of one layer of the kernel as the model stores it.
      dtype: the kernel's dtype before quantization.
      block_size: elements per absmax block.
    """

    parts: dict[str, Array]
    kind: str
    layer_shape: tuple[int, ...]
    dtype: Any
    block_size: int

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.parts["codes"].shape[:-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack_shape + tuple(self.layer_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def double_quant(self) -> bool:
        return "absmax_codes" in self.parts

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in self.parts.values())

    def dequantize(self) -> Array:
        """The kernel as an array of ``shape`` and ``dtype`` (jit-able; under ``jit`` XLA
        computes it where it is used and keeps no copy)."""
        layer = lambda parts: quant.dequantize_blocks(parts, self.kind, self.layer_shape, self.dtype, self.block_size)
        for _ in self.stack_shape:
            layer = jax.vmap(layer)
        return layer(self.parts)

    def replace(self, **changes: Any) -> "Quantized":
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(Quantized, data_fields=["parts"],
                                 meta_fields=["kind", "layer_shape", "dtype", "block_size"])


def quantize_kernel(kernel: Array, kind: str = "nf4", *, block_size: int = 64, double_quant: bool = True,
                    stack: int = 0) -> Quantized:
    """One kernel quantized (:func:`jpeft.quant.quantize_blocks`), each layer of its ``stack``
    leading (stacked) axes on its own. Unchecked: :func:`jpeft.quantize` validates."""
    layer = lambda x: quant.quantize_blocks(x, kind, block_size, double_quant)
    for _ in range(stack):
        layer = jax.vmap(layer)
    return Quantized(parts=layer(kernel), kind=kind, layer_shape=tuple(kernel.shape[stack:]),
                     dtype=np.dtype(kernel.dtype), block_size=block_size)


def is_quantized(x: Any) -> bool:
    return isinstance(x, Quantized)


def is_leaf(x: Any) -> bool:
    """What jpeft's tree functions treat as one leaf: arrays, nodes and quantized kernels."""
    return isinstance(x, (Node, Quantized))
