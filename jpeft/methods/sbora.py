"""SBoRA: standard-basis LoRA (Po, Liu, Wu, Zhang, Yu, Wang, Jiang & Li, "SBoRA: Low-Rank
Adaptation with Regional Weight Updates", ICONIP 2024; arXiv 2407.05413).

Paper notation, ``W₀`` (out × in), LoRA's ``ΔW = B A`` with one factor fixed to ``r``
distinct standard basis vectors ``e_i`` and the other trainable from zero:

    SBoRA-FA:  W' = W₀ + s · B A_sb,   A_sb = [e_{i_1} … e_{i_r}]ᵀ   (only columns i_k of W change)
    SBoRA-FB:  W' = W₀ + s · B_sb A,   B_sb = [e_{i_1} … e_{i_r}]    (only rows i_k of W change)

with ``s = α / r`` as LoRA (the authors' code scales both variants by ``lora_alpha / r``).
On the Flax kernel ``K = W₀ᵀ`` (in, out) a column of ``W`` is a row of ``K``:

    FA:  K'[idx, :] = K[idx, :] + s · b,    b = Bᵀ (r × out),  y = x K + s · x[..., idx] b
    FB:  K'[:, idx] = K[:, idx] + s · a,    a = Aᵀ (in × r),   y = x K, then y[..., idx] += s · x a

and every other entry of ``K'`` is the base's, bit for bit. ``idx`` (r distinct indices
into the input dimension for FA, the output dimension for FB, in the order drawn from the
key, like the authors' ``random.sample``) is a frozen int32 vector named ``index``; the
trainable factor starts at zero, so ``K' = K`` exactly at init. HF PEFT has no SBoRA; in the
authors' fork (``adapter_name="sbora_fa"``/``"sbora_fb"``) ``lora_B.weight = bᵀ`` with
``lora_A = index`` (FA) and ``lora_A.weight = aᵀ`` with ``lora_B = index`` (FB).

Paths: factored gathers the ``r`` input features (FA) or scatter-adds ``r`` outputs (FB),
never multiplying by a one-hot matrix: ``4·T·in·out + 6·T·r·out`` (FA) or ``6·T·in·r`` (FB)
per training step, about half of LoRA's adapter and no weight gradient; materializing
scatter-adds ``s·b`` (``s·a``) into ``K`` (``O(r·out)``) but pays the dense ``6·T·in·out``.
Factored wins for every ``r`` that fits. Dropout (on the adapter input) is factored-only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft.methods import base
from jpeft.node import Node

FIXED = ("a", "b")


@dataclasses.dataclass(frozen=True)
class SboraConfig:
    """r: number of standard basis vectors (the rank); fixed: ``"a"`` (SBoRA-FA: ``r`` input
    features, rows of the Flax kernel, change) or ``"b"`` (SBoRA-FB: ``r`` outputs, columns
    of the Flax kernel); alpha: scale numerator (``s = alpha / r``); dropout: rate on the
    adapter input during training."""

    r: int = 16
    fixed: str = "a"
    alpha: float = 32.0
    dropout: float = 0.0

    def __post_init__(self):
        base.positive_int("r", self.r)
        base.require(self.fixed in FIXED, f"fixed must be one of {FIXED} (SBoRA-FA or SBoRA-FB), got {self.fixed!r}")
        base.positive_float("alpha", self.alpha)
        base.probability("dropout", self.dropout)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def check(self, shape: tuple[int, int]) -> None:
        axis, dim = ("input", shape[0]) if self.fixed == "a" else ("output", shape[1])
        base.require(self.r <= dim, f"r={self.r} exceeds the {axis} dimension {dim} of a {shape} kernel, which "
                                    f"SBoRA-F{self.fixed.upper()} picks {self.r} distinct standard basis vectors from")


def init(key, kernel, config: SboraConfig):
    n, m = kernel.shape
    dim = n if config.fixed == "a" else m
    index = jax.random.choice(key, dim, (config.r,), replace=False).astype(jnp.int32)
    if config.fixed == "a":  # B (here b = Bᵀ, r × out) trains from zero
        return {"b": jnp.zeros((config.r, m), jnp.float32)}, {"kernel": kernel, "index": index}
    return {"a": jnp.zeros((n, config.r), jnp.float32)}, {"kernel": kernel, "index": index}


def materialize(node: Node) -> jax.Array:
    """``K`` with ``s·b`` added to rows ``index`` (FA) or ``s·a`` to columns ``index`` (FB)."""
    kernel, index = node.frozen["kernel"].astype(jnp.float32), node.frozen["index"]
    s = node.config.scale
    if node.config.fixed == "a":
        return kernel.at[index, :].add(s * node.trainable["b"])
    return kernel.at[:, index].add(s * node.trainable["a"])


def factored(x, node: Node, dropout_key=None):
    index, s = node.frozen["index"], jnp.asarray(node.config.scale, x.dtype)
    y = x @ node.frozen["kernel"].astype(x.dtype)
    h = base.dropout(x, node.config.dropout, dropout_key)
    if node.config.fixed == "a":
        return y + (jnp.take(h, index, axis=-1) @ node.trainable["b"].astype(x.dtype)) * s
    return y.at[..., index].add((h @ node.trainable["a"].astype(x.dtype)) * s)


def flops(node: Node, tokens: int):
    n, m = node.shape
    r = node.config.r
    if node.config.fixed == "a":
        adapter = 6.0 * tokens * r * m + tokens * (m + r)  # products; the add to y, the scatter of dx
        rebuild = 2.0 * r * m
    else:
        adapter = 6.0 * tokens * n * r + 2.0 * tokens * r  # products; the scatter-add and its gather
        rebuild = 2.0 * n * r
    return base.frozen_step_flops(node, tokens) + adapter, base.dense_step_flops(node, tokens) + rebuild


METHOD = base.Method(SboraConfig, init, materialize, factored, flops)
