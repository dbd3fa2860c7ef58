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

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Node:
    """A reparametrized kernel of shape ``shape`` = (in, out), computing ``y = x @ W'``.

    Attributes:
      method: registry name of the method (``jpeft.methods[method]``).
      config: the method's frozen, hashable hyper-parameter dataclass.
      shape: ``(in, out)`` of the kernel this node stands for.
      dtype: dtype of the kernel it replaced (what ``materialize`` returns).
      trainable: dict of arrays updated by the optimizer.
      frozen: dict of arrays kept fixed (e.g. the base kernel, singular vectors).
    """

    method: str
    config: Any
    shape: tuple[int, int]
    dtype: Any
    trainable: dict[str, Array]
    frozen: dict[str, Array]

    def replace(self, **changes: Any) -> "Node":
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    Node,
    data_fields=["trainable", "frozen"],
    meta_fields=["method", "config", "shape", "dtype"],
)


def is_node(x: Any) -> bool:
    return isinstance(x, Node)
