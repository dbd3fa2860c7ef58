"""BOFT: orthogonal fine-tuning by butterfly factorization (Liu et al., ICLR 2024; thesis §5.3).

The rotation is a product of ``n_butterfly`` sparse orthogonal factors, each a permuted
block-diagonal Cayley matrix ``B_i = P_i diag(R_{i,1}, …) P_iᵀ`` with the Cooley–Tukey
block-butterfly permutations ``P_i`` (the first one the identity), so that after
``log2(in / b)`` factors every input reaches every output with ``O(in·b·log)`` parameters.

Exactly HF PEFT's BOFT (it rotates inputs and scales outputs): thesis notation
``M' = diag(s) M (B_{f-1} ⋯ B_0)ᵀ``; on the Flax kernel ``K``, ``K' = (B_{f-1} ⋯ B_0) K diag(s)``
with ``y = ((x B_{f-1} ⋯ B_0) K) ⊙ s``. Each block is stored, like PEFT's ``boft_R``, as a
full b × b matrix ``A`` whose skew part gives ``Q = (Aᵀ - A)/2`` and ``R = cayley(Q)``;
``A = 0`` and ``s = 1`` at init. Parameter counts and values therefore match PEFT
(``boft_R = blocks``, ``boft_s = s``); half of each ``A`` (its symmetric part) has zero
gradient.

Paths: factored applies the ``f`` factors to activations by gathers and batched b × b
matmuls, ``O(T·in·b·f)``, and the base kernel gets no weight gradient; materializing pays
the dense ``6·T·in·out``. Factored is chosen whenever ``b·f < out``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jpeft import linalg
from jpeft.methods import base
from jpeft.node import Node


@dataclasses.dataclass(frozen=True)
class BoftConfig:
    """block_size: b, the size of each orthogonal block (even when n_butterfly > 1);
    n_butterfly: the number of butterfly factors (1 is block-diagonal OFT on the inputs)."""

    block_size: int = 8
    n_butterfly: int = 1

    def __post_init__(self):
        base.positive_int("block_size", self.block_size)
        base.positive_int("n_butterfly", self.n_butterfly)

    def check(self, shape):
        dim, b, f = shape[0], self.block_size, self.n_butterfly
        base.require(dim % b == 0, f"block_size={b} does not divide the input dimension {dim} of a {shape} kernel")
        if f > 1:
            span = b * 2 ** (f - 1)
            base.require(b % 2 == 0, f"block_size={b} must be even when n_butterfly={f} > 1")
            base.require(
                dim % span == 0,
                f"n_butterfly={f} with block_size={b} needs the input dimension {dim} of a {shape} kernel "
                f"to be a multiple of block_size * 2**(n_butterfly - 1) = {span}",
            )

    def permutations(self, dim: int) -> list[np.ndarray]:
        """The index vectors of ``P_0 … P_{f-1}``."""
        num, b, f = dim // self.block_size, self.block_size, self.n_butterfly
        return [linalg.butterfly_permutation(dim, num // 2**i, b // 2, enabled=f > 1) for i in range(f)]


def init(key, kernel, config: BoftConfig):
    n, m = kernel.shape
    b = config.block_size
    trainable = {
        "blocks": jnp.zeros((config.n_butterfly, n // b, b, b), jnp.float32),
        "scale": jnp.ones((m,), jnp.float32),
    }
    return trainable, {"kernel": kernel}


def rotate_inputs(x, node: Node, *, transpose: bool = False):
    """``x @ B`` with ``B = B_{f-1} ⋯ B_0`` (or ``x @ Bᵀ``), factor by factor.

    ``x @ P = x[..., argsort(perm)]`` and ``x @ Pᵀ = x[..., perm]``; the block rotations
    are applied by batched b × b matmuls, never as dense in × in matrices.
    """
    a = node.trainable["blocks"]
    rotations = linalg.cayley((jnp.swapaxes(a, -1, -2) - a) / 2).astype(x.dtype)
    if transpose:
        rotations = jnp.swapaxes(rotations, -1, -2)
    factors = list(enumerate(node.config.permutations(node.shape[0])))
    for i, perm in factors if transpose else reversed(factors):
        identity = np.array_equal(perm, np.arange(perm.size))  # P_0, and every P_i with one factor
        x = x if identity else x[..., np.argsort(perm)]  # XLA would copy through an identity gather
        x = linalg.apply_block_diag(x, rotations[i])
        x = x if identity else x[..., perm]
    return x


def materialize(node: Node):
    """``K' = B K diag(s)``, computed as ``(Kᵀ Bᵀ)ᵀ`` in O(in·out·b·f)."""
    kernel = node.frozen["kernel"].astype(jnp.float32)
    return rotate_inputs(kernel.T, node, transpose=True).T * node.trainable["scale"]


def factored(x, node: Node, dropout_key=None):
    y = rotate_inputs(x, node) @ node.frozen["kernel"].astype(x.dtype)
    return y * node.trainable["scale"].astype(x.dtype)


def flops(node: Node, tokens: int):
    n, m = node.shape
    f, b = node.config.n_butterfly, node.config.block_size
    rotate = 3 * 2.0 * tokens * n * b * f
    build = 3 * 2.0 * n * m * b * f
    return base.frozen_step_flops(node, tokens) + rotate + 4.0 * tokens * m, base.dense_step_flops(node, tokens) + build


METHOD = base.Method(BoftConfig, init, materialize, factored, flops, frozen_from_base=base.base_kernel)
