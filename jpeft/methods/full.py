"""Full training of chosen leaves (HF PEFT's ``modules_to_save``; ``apply(..., also_train=)``).

A ``full`` node holds one leaf of the model (a bias, a norm's scale, a classifier head)
as a trainable float32 array ``weight``, and nothing frozen: ``W' = weight``, cast back to
the leaf's dtype on use. It has no factored form; as a kernel it is an ordinary matmul.
Its layout is ``""``: any shape, not read as a matrix.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft.methods import base
from jpeft.node import Node


@dataclasses.dataclass(frozen=True)
class FullConfig:
    """No hyper-parameters."""

    def check(self, shape) -> None:
        pass


def init(key, leaf, config: FullConfig):
    return {"weight": jnp.asarray(leaf, jnp.float32)}, {}


def materialize(node: Node) -> jax.Array:
    return node.trainable["weight"]


def factored(x, node: Node, dropout_key=None):
    return x @ node.trainable["weight"].astype(x.dtype)


def flops(node: Node, tokens: int):
    dense = base.dense_step_flops(node, tokens)
    return dense, dense


METHOD = base.Method(FullConfig, init, materialize, factored, flops)
