"""A small decoder-only LM built only from stock flax modules, in linen and in NNX.

It exists to show jpeft on models it did not write: nothing here knows of jpeft. The
linen model is ``nn.Embed``, then per layer a pre-norm causal
``nn.MultiHeadDotProductAttention`` and a ``nn.Dense`` GELU MLP, then ``nn.LayerNorm`` and
a ``nn.Dense`` head; the NNX model is the same with ``nnx.Embed``,
``nnx.MultiHeadAttention``, ``nnx.Linear`` and ``nnx.LayerNorm``. Attention kernels are
3-D: q/k/v (hidden, heads, head_dim), layout ``"ioo"``; the output (heads, head_dim,
hidden), ``"iio"`` (:data:`LAYOUT`). The benchmark (``jpeft bench --model linen:small``)
adapts :data:`TARGETS` with ``jpeft.apply`` and runs the step through ``jpeft.wrap``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

ARCHS = ("linen", "nnx")

#: The attention projections and both MLP kernels of every layer (not the embedding or head).
TARGETS = (r".*(query|key|value|out)/kernel", r".*(mlp_up|mlp_down)/kernel")

#: q/k/v kernels are (hidden, heads, head_dim), the output kernel (heads, head_dim, hidden).
LAYOUT = {r".*out/kernel": "iio", r".*(query|key|value)/kernel": "ioo"}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab: int
    hidden: int
    layers: int
    heads: int
    mlp: int

    @classmethod
    def like(cls, phi_config) -> "DecoderConfig":
        """The sizes of a :mod:`jpeft.models.phi` configuration."""
        c = phi_config
        return cls(c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size)

    def matmul_params(self) -> int:
        """Parameters of the matrix products per token (embedding lookup excluded)."""
        return self.layers * (4 * self.hidden**2 + 2 * self.hidden * self.mlp) + self.hidden * self.vocab


class LinenBlock(nn.Module):
    cfg: DecoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        h = nn.LayerNorm(**kw)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.cfg.heads, name="attention", **kw)(h, mask=mask)
        h = nn.LayerNorm(**kw)(x)
        h = nn.Dense(self.cfg.mlp, name="mlp_up", **kw)(h)
        return x + nn.Dense(self.cfg.hidden, name="mlp_down", **kw)(nn.gelu(h))


class LinenDecoder(nn.Module):
    cfg: DecoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Embed(self.cfg.vocab, self.cfg.hidden, **kw)(ids)
        for i in range(self.cfg.layers):
            x = LinenBlock(self.cfg, name=f"layer_{i}", **kw)(x)
        return nn.Dense(self.cfg.vocab, name="head", **kw)(nn.LayerNorm(**kw)(x)).astype(jnp.float32)


class NnxBlock(nnx.Module):
    def __init__(self, cfg: DecoderConfig, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = nnx.LayerNorm(cfg.hidden, **kw)
        self.attention = nnx.MultiHeadAttention(cfg.heads, cfg.hidden, decode=False, **kw)
        self.norm2 = nnx.LayerNorm(cfg.hidden, **kw)
        self.mlp_up = nnx.Linear(cfg.hidden, cfg.mlp, **kw)
        self.mlp_down = nnx.Linear(cfg.mlp, cfg.hidden, **kw)

    def __call__(self, x):
        mask = nnx.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        x = x + self.attention(self.norm1(x), mask=mask)
        return x + self.mlp_down(nnx.gelu(self.mlp_up(self.norm2(x))))


class NnxDecoder(nnx.Module):
    def __init__(self, cfg: DecoderConfig, dtype=jnp.float32, param_dtype=jnp.float32, *, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed = nnx.Embed(cfg.vocab, cfg.hidden, **kw)
        self.layers = nnx.List([NnxBlock(cfg, dtype, param_dtype, rngs) for _ in range(cfg.layers)])
        self.norm = nnx.LayerNorm(cfg.hidden, **kw)
        self.head = nnx.Linear(cfg.hidden, cfg.vocab, **kw)

    def __call__(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x)).astype(jnp.float32)


def build(arch: str, cfg: DecoderConfig, key: jax.Array, dtype=jnp.float32, param_dtype=jnp.float32,
          abstract: bool = False) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
    """``(apply, params)``: ``apply(params, ids) -> float32 logits`` and the parameter tree
    (linen ``params`` or NNX state) for ``arch`` in :data:`ARCHS`; with ``abstract``, the
    parameters are ``jax.ShapeDtypeStruct`` (nothing allocated)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if arch == "linen":
        model = LinenDecoder(cfg, dtype, param_dtype)
        init = lambda k: model.init(k, jnp.zeros((1, 4), jnp.int32))["params"]
        return (lambda p, ids: model.apply({"params": p}, ids)), (jax.eval_shape(init, key) if abstract else init(key))
    make = lambda: nnx_module(cfg, key, dtype, param_dtype)
    graphdef, state = nnx.split(nnx.eval_shape(make) if abstract else make())
    return (lambda s, ids: nnx.merge(graphdef, s)(ids)), state


def linen_module(cfg: DecoderConfig, dtype=jnp.float32, param_dtype=jnp.float32) -> nn.Module:
    """The linen module itself (what qwix's LoRA provider rewrites)."""
    return LinenDecoder(cfg, dtype, param_dtype)


def nnx_module(cfg: DecoderConfig, key: jax.Array, dtype=jnp.float32, param_dtype=jnp.float32) -> NnxDecoder:
    """The NNX model itself, initialized from ``key`` (what qwix's LoRA provider rewrites);
    :func:`build` with the same key gives the same weights."""
    return NnxDecoder(cfg, dtype, param_dtype, rngs=nnx.Rngs(params=key))
