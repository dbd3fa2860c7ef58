"""Phi-1.5 (transformers' ``PhiForCausalLM``) in Flax, consuming jpeft nodes directly.

Architecture: a decoder-only transformer whose blocks are *parallel*,
``x + attn(ln(x)) + mlp(ln(x))`` with one LayerNorm, rotary embeddings on the first
``partial_rotary_factor`` of each head (rotate-half convention), ``gelu_new`` MLP, biases
on every linear layer including ``lm_head``, untied embeddings.

Every linear layer computes ``jpeft.linear(x, kernel) + bias``: the kernel may be a plain
(in, out) array or a jpeft node, whose factored path then runs. The parameter tree
mirrors transformers' names (``model/layers_0/self_attn/q_proj/kernel`` for
``model.layers.0.self_attn.q_proj.weight``), so jpeft's default targets select Q/K/V.

Matmuls run in ``dtype``; LayerNorm, softmax and logits in float32; parameters are
stored in ``param_dtype``.

    model, params = phi.from_pretrained("microsoft/phi-1_5", dtype=jnp.bfloat16)
    logits = model.apply({"params": params}, input_ids, attention_mask)
    tokens = phi.generate(model, params, input_ids, attention_mask, max_new_tokens=20)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict
from transformers import PhiConfig

from jpeft import hooks as jhooks, sharding
from jpeft.core import linear, resolve_full, uses_dropout
from jpeft.node import is_node, is_quantized

Array = jax.Array
PyTree = Any
DType = Any

NAMED_CONFIGS = {
    "phi-1.5": dict(
        vocab_size=51200, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
        max_position_embeddings=2048, bos_token_id=50256, eos_token_id=50256,
    ),
    # the size that finds CPU hangs and slow paths tiny shapes hide (a few steps on a laptop)
    "small": dict(
        vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
        max_position_embeddings=2048, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ),
    "tiny": dict(
        vocab_size=1024, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ),
    # a 7B-class Phi (≈6.9 B parameters), no published checkpoint: it exists for shapes-only
    # benches (`jpeft bench --compile-only`, e.g. per-device memory on a mesh) and `jpeft count`;
    # initializing it for real takes ≈14 GB in bf16 (28 GB in float32)
    "phi-7b": dict(
        vocab_size=51200, hidden_size=4096, intermediate_size=16384, num_hidden_layers=32, num_attention_heads=32,
        max_position_embeddings=2048, bos_token_id=50256, eos_token_id=50256,
    ),
}
_COMMON = dict(
    hidden_act="gelu_new", layer_norm_eps=1e-5, partial_rotary_factor=0.5, rope_theta=10000.0,
    resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False, qk_layernorm=False,
)
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh approximation


def config(name: str) -> PhiConfig:
    """A named configuration, known offline: ``"phi-1.5"`` (microsoft/phi-1_5), ``"phi-7b"`` (its
    architecture at 6.9 B parameters, for shapes-only benches and counts), ``"small"`` (4 layers,
    hidden 512, vocab 8192: realistic shapes that run on a CPU) or ``"tiny"`` (for tests)."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown model configuration {name!r}; known: {sorted(NAMED_CONFIGS)}")
    return PhiConfig(**_COMMON, **NAMED_CONFIGS[name])


def load_config(cfg: PhiConfig | dict | str | os.PathLike) -> PhiConfig:
    """A ``PhiConfig`` from itself, a dict, a config.json path or a checkpoint directory."""
    if isinstance(cfg, PhiConfig):
        return cfg
    if not isinstance(cfg, dict):
        path = os.path.join(cfg, "config.json") if os.path.isdir(cfg) else cfg
        with open(path) as f:
            cfg = json.load(f)
    if cfg.get("model_type", "phi") != "phi":
        raise ValueError(f"expected a Phi configuration (model_type 'phi'), got model_type {cfg['model_type']!r}")
    return PhiConfig(**cfg)


def _rope_value(cfg: PhiConfig, name: str, default):
    """A RoPE setting from ``rope_parameters`` (transformers 5) or the config itself (4.x)."""
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return params.get(name, getattr(cfg, name, default))


@dataclasses.dataclass(frozen=True)
class Spec:
    """The static, hashable facts of a configuration that the Flax modules need."""

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    rotary_dim: int
    rope_theta: float
    eps: float
    max_positions: int
    resid_pdrop: float
    embd_pdrop: float
    attention_dropout: float
    init_std: float
    special_token_ids: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_config(cls, cfg: PhiConfig) -> "Spec":
        """Read a ``PhiConfig``; NotImplementedError for variants this port does not cover."""
        rope_type = _rope_value(cfg, "rope_type", _rope_value(cfg, "type", "default"))
        unsupported = {
            "qk_layernorm=True": getattr(cfg, "qk_layernorm", False),
            f"hidden_act={cfg.hidden_act!r} (supported: {_GELU_TANH})": cfg.hidden_act not in _GELU_TANH,
            "tie_word_embeddings=True": getattr(cfg, "tie_word_embeddings", False),
            "grouped-query attention (num_key_value_heads != num_attention_heads)":
                (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) != cfg.num_attention_heads,
            f"rope type {rope_type!r}": rope_type != "default",
        }
        bad = [what for what, hit in unsupported.items() if hit]
        if bad:
            raise NotImplementedError(f"jpeft.models.phi does not support {', '.join(bad)}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by {cfg.num_attention_heads} heads")
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        return cls(
            vocab_size=cfg.vocab_size, hidden=cfg.hidden_size, layers=cfg.num_hidden_layers,
            heads=cfg.num_attention_heads, intermediate=cfg.intermediate_size,
            rotary_dim=int(head_dim * _rope_value(cfg, "partial_rotary_factor", 0.5)),
            rope_theta=float(_rope_value(cfg, "rope_theta", 10000.0)), eps=cfg.layer_norm_eps,
            max_positions=cfg.max_position_embeddings, resid_pdrop=cfg.resid_pdrop, embd_pdrop=cfg.embd_pdrop,
            attention_dropout=cfg.attention_dropout or 0.0, init_std=cfg.initializer_range,
            special_token_ids=tuple(sorted({i for i in (cfg.bos_token_id, cfg.eos_token_id, getattr(cfg, "pad_token_id", None))
                                            if isinstance(i, int)})),
        )


# ------------------------------------------------------------------------- modules


class Linear(nn.Module):
    """``jpeft.linear(x, kernel) + bias``; the kernel may be a jpeft node.

    flax's ``self.param`` checks an existing value's first leaf against the declared
    shape, which a node (whose leaves are its factors) fails; a node is therefore read
    with ``get_variable`` and checked against its own ``shape``.
    """

    features: int
    dtype: DType
    param_dtype: DType
    init_std: float

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        shape = (x.shape[-1], self.features)
        kernel = self.get_variable("params", "kernel")
        if is_node(kernel) or is_quantized(kernel):
            if tuple(kernel.shape) != shape:
                raise ValueError(f"{'/'.join(self.path)}/kernel: {'node' if is_node(kernel) else 'quantized kernel'} "
                                 f"of shape {kernel.shape}, the layer needs {shape}")
        else:
            kernel = self.param("kernel", nn.initializers.normal(self.init_std), shape, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        key = self.make_rng("dropout") if uses_dropout(kernel) and not deterministic else None
        y = linear(x.astype(self.dtype), kernel, dropout_key=key)
        return y + bias.astype(y.dtype)


def rotary(x: Array, positions: Array, spec: Spec) -> Array:
    """Rotary embedding (HF's rotate-half) on the first ``rotary_dim`` features of each head.

    ``x``: (batch, length, heads, head_dim); ``positions``: (batch, length).
    """
    rd = spec.rotary_dim
    inv_freq = 1.0 / (spec.rope_theta ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    rot = x[..., :rd].astype(jnp.float32)
    half = jnp.concatenate([-rot[..., rd // 2 :], rot[..., : rd // 2]], axis=-1)
    rot = rot * jnp.cos(emb) + half * jnp.sin(emb)
    return jnp.concatenate([rot.astype(x.dtype), x[..., rd:]], axis=-1)


#: What a decoder layer keeps for the backward pass (``jax.checkpoint`` policies).
REMAT_POLICIES = {
    "none": None,  # everything (no rematerialization)
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # linear-layer outputs
    "full": jax.checkpoint_policies.nothing_saveable,  # only the layer's input
}


def check_remat(remat: str) -> None:
    """ValueError unless ``remat`` names one of :data:`REMAT_POLICIES`."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")


class Attention(nn.Module):
    spec: Spec
    dtype: DType
    param_dtype: DType

    @nn.compact
    def __call__(self, x, positions, allowed, deterministic, layer_cache=None, cache_index=None, prefix=None):
        s = self.spec
        dense = lambda name: Linear(s.hidden, self.dtype, self.param_dtype, s.init_std, name=name)  # noqa: E731
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, s.heads, s.head_dim)  # noqa: E731
        q = rotary(split(dense("q_proj")(x, deterministic)), positions, s)
        k = rotary(split(dense("k_proj")(x, deterministic)), positions, s)
        v = split(dense("v_proj")(x, deterministic))
        new_cache = None
        if layer_cache is not None:
            k, v = (jax.lax.dynamic_update_slice(layer_cache[n], y.astype(layer_cache[n].dtype), (0, cache_index, 0, 0))
                    for n, y in (("k", k), ("v", v)))
            new_cache = {"k": k, "v": v}
        if prefix is not None:
            pk, pv = (jnp.swapaxes(p, 1, 2).astype(k.dtype) for p in prefix)  # (B, P, H, D)
            k, v = jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)
            allowed = jnp.concatenate([jnp.ones((*allowed.shape[:-1], pk.shape[1]), bool), allowed], axis=-1)
        scores = jnp.einsum("bthd,bshd->bhts", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = jnp.where(allowed, scores / math.sqrt(s.head_dim), jnp.finfo(jnp.float32).min)
        probs = nn.Dropout(s.attention_dropout)(jax.nn.softmax(scores, axis=-1), deterministic=deterministic)
        out = jnp.einsum("bhts,bshd->bthd", probs.astype(self.dtype), v.astype(self.dtype)).reshape(b, t, s.hidden)
        return dense("dense")(out, deterministic), new_cache


class MLP(nn.Module):
    spec: Spec
    dtype: DType
    param_dtype: DType

    @nn.compact
    def __call__(self, x, deterministic):
        s = self.spec
        h = Linear(s.intermediate, self.dtype, self.param_dtype, s.init_std, name="fc1")(x, deterministic)
        h = jax.nn.gelu(h, approximate=True)  # gelu_new
        return Linear(s.hidden, self.dtype, self.param_dtype, s.init_std, name="fc2")(h, deterministic)


def _layer_norm(spec: Spec, param_dtype: DType, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(spec.eps, dtype=jnp.float32, param_dtype=param_dtype, use_fast_variance=False, name=name)


class DecoderLayer(nn.Module):
    spec: Spec
    dtype: DType
    param_dtype: DType
    index: int = 0

    @nn.compact
    def __call__(self, x, positions, allowed, deterministic, layer_cache=None, cache_index=None, prefix=None,
                 hooks=None, context=None):
        s = self.spec
        key = self.make_rng("dropout") if hooks and not deterministic and jhooks.uses_key(hooks) else None
        keys = [None if key is None else jax.random.fold_in(key, i) for i in range(4)]
        hook = lambda site, out, inp, k: out if not hooks else jhooks.residual(  # noqa: E731
            hooks, self.index, site, out, inp, context, k)
        x = hook("input", x, x, keys[0])
        h = _layer_norm(s, self.param_dtype, "input_layernorm")(x).astype(self.dtype)
        attn, new_cache = Attention(s, self.dtype, self.param_dtype, name="self_attn")(
            h, positions, allowed, deterministic, layer_cache, cache_index, prefix
        )
        mlp = MLP(s, self.dtype, self.param_dtype, name="mlp")(h, deterministic)
        attn, mlp = hook("attn", attn, h, keys[1]), hook("mlp", mlp, h, keys[2])
        drop = nn.Dropout(s.resid_pdrop, deterministic=deterministic)
        out = x + (drop(attn) + drop(mlp)).astype(x.dtype)
        return hook("output", out, x, keys[3]), new_cache


class PhiModel(nn.Module):
    spec: Spec
    dtype: DType
    param_dtype: DType
    remat: str = "none"

    @nn.compact
    def __call__(self, input_ids, inputs_embeds, positions, allowed, deterministic, cache=None, cache_index=None,
                 prefix_kv=None, virtual=None, hooks=None, context=None):
        s = self.spec
        embed = nn.Embed(s.vocab_size, s.hidden, param_dtype=self.param_dtype,
                         embedding_init=nn.initializers.normal(s.init_std), name="embed_tokens")
        x = embed(input_ids) if inputs_embeds is None else inputs_embeds
        if virtual is not None:  # prompt / P-tuning's virtual tokens before the sequence
            x = jnp.concatenate([virtual.astype(x.dtype), x], axis=1)
        x = nn.Dropout(s.embd_pdrop)(x.astype(self.dtype), deterministic=deterministic)
        new_caches = []
        layer = DecoderLayer if self.remat == "none" else nn.remat(  # deterministic (argument 4) is static
            DecoderLayer, static_argnums=(4,), policy=REMAT_POLICIES[self.remat])
        for i in range(s.layers):
            x, c = layer(s, self.dtype, self.param_dtype, i, name=f"layers_{i}")(
                x, positions, allowed, deterministic,
                None if cache is None else cache[i], cache_index, None if prefix_kv is None else prefix_kv[i],
                hooks, context,
            )
            new_caches.append(c)
        x = _layer_norm(s, self.param_dtype, "final_layernorm")(x)
        return x.astype(self.dtype), new_caches


def _check_shape(name: str, x: Any, shape: tuple) -> None:
    """ValueError unless ``x.shape`` matches ``shape`` (``None`` entries match anything)."""
    found = tuple(getattr(x, "shape", ()))
    if len(found) != len(shape) or any(w is not None and w != f for w, f in zip(shape, found)):
        want = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {found}")


class PhiForCausalLM(nn.Module):
    """Phi causal LM; ``apply({"params": params}, input_ids, attention_mask=None, ...)``.

    ``remat`` (a key of :data:`REMAT_POLICIES`) rematerializes each decoder layer in the
    backward pass: same numbers, less activation memory, some recomputation.

    Args (of ``__call__``):
      input_ids: int (batch, length); or ``inputs_embeds`` (batch, length, hidden) instead.
      attention_mask: (batch, length), 1 on tokens and 0 on padding (left or right). With
        a cache it covers only the new tokens; the cache remembers earlier ones.
      position_ids: (batch, length); default ``max(cumsum(mask) - 1, 0)`` over everything
        seen so far, so left-padded prompts get the positions HF ``generate`` gives them.
        Positions number the real tokens: the model shifts them past the virtual tokens and
        the prefix below (as transformers numbers tokens after a ``past_key_values`` prefix).
      prefix_kv: one ``(key, value)`` per layer, each (batch, heads, prefix, head_dim),
        used as is (no rotary) and attended to by every position; the prefix takes the
        first positions (a prefix-tuning node gives it from the parameters instead).
      cache: from :func:`init_cache`; the new tokens are written at its ``index``.
      deterministic: False enables dropout (the config's rates and jpeft adapter
        dropout), drawing from the ``"dropout"`` rng.
      prompt_mask: (batch, length) bool, the prompt's tokens, where position-based
        interventions (LoReFT) count; default: every attended token of a pass that starts
        the sequence, none of one that continues it.
      start: whether this pass starts the sequence (prompt and P-tuning's virtual tokens are
        prepended then); default ``True`` without a cache, and required with a cache when
        the parameters hold such methods (``True`` for the prompt, ``False`` after).
      hooks: the nodes of methods that add computation (:mod:`jpeft.hooks`); ``apply``
        takes them from ``params["jpeft"]``.

    Returns:
      float32 logits (batch, length, vocab) of the real tokens (virtual tokens give none),
      or ``(logits, cache)`` when a cache is given.
    """

    spec: Spec
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    remat: str = "none"

    def apply(self, variables, *args, **kwargs):
        """linen's ``apply``; kernel nodes reach the layers as they are (each ``Linear`` runs
        its node's factored path), fully trained leaves (``also_train``, BitFit's biases)
        as their arrays, and the nodes of methods that add computation
        (``params["jpeft"]``, :mod:`jpeft.hooks`) run at the model's hook points."""
        variables = dict(resolve_full(variables))
        variables["params"], hooks = jhooks.split(variables.get("params", {}))
        if hooks:
            kwargs["hooks"] = hooks
        return super().apply(variables, *args, **kwargs)

    def jpeft_dims(self) -> jhooks.ModelDims:
        """The hook protocol's description of this model: every hook point is implemented."""
        s = self.spec
        return jhooks.ModelDims(hidden=s.hidden, layers=s.layers, heads=s.heads, head_dim=s.head_dim,
                                max_positions=s.max_positions, vocab_size=s.vocab_size,
                                embedding="model/embed_tokens/embedding", special_token_ids=s.special_token_ids)

    @nn.compact
    def __call__(self, input_ids: Array | None = None, attention_mask: Array | None = None,
                 position_ids: Array | None = None, *, inputs_embeds: Array | None = None,
                 prefix_kv: Sequence[tuple[Array, Array]] | None = None, cache: dict | None = None,
                 deterministic: bool = True, prompt_mask: Array | None = None, start: bool | None = None,
                 hooks: dict | None = None):
        s = self.spec
        hooks = hooks or {}
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            _check_shape("input_ids", input_ids, (None, None))
            if not jnp.issubdtype(input_ids.dtype, jnp.integer):
                raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
            b, t = input_ids.shape
        else:
            _check_shape("inputs_embeds", inputs_embeds, (None, None, s.hidden))
            b, t = inputs_embeds.shape[:2]
        for name, x in (("attention_mask", attention_mask), ("position_ids", position_ids), ("prompt_mask", prompt_mask)):
            if x is not None:
                _check_shape(name, x, (b, t))
        n_virtual = jhooks.num_virtual_tokens(hooks)
        if start is None:
            if cache is not None and jhooks.needs_start(hooks):
                raise ValueError("with a cache and prompt/P-tuning or position-based hooks, say whether this pass starts "
                                 "the sequence (start=True for the prompt, False for the tokens after it)")
            start = True
        elif not start and cache is None:
            raise ValueError("start=False continues a sequence, which needs its cache")
        virtual = jhooks.virtual_embeddings(hooks, b, self.dtype) if start and n_virtual else None
        hook_prefix = jhooks.prefix_kv(hooks, b, self.jpeft_dims(), self.dtype)
        if hook_prefix is not None:
            if prefix_kv is not None:
                raise ValueError("prefix_kv given to a model whose parameters hold a prefix-tuning node")
            prefix_kv = hook_prefix
        if prefix_kv is not None:
            if len(prefix_kv) != s.layers:
                raise ValueError(f"prefix_kv has {len(prefix_kv)} entries, the model has {s.layers} layers")
            p = prefix_kv[0][0].shape[2] if prefix_kv[0][0].ndim == 4 else None
            for i, kv in enumerate(prefix_kv):
                for part, x in zip(("key", "value"), kv):
                    _check_shape(f"prefix_kv[{i}] {part}", x, (b, s.heads, p, s.head_dim))
        n_prefix = 0 if prefix_kv is None else prefix_kv[0][0].shape[2]
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        prompt_mask = (mask & start) if prompt_mask is None else prompt_mask.astype(bool)
        if virtual is not None:  # the virtual tokens are attended, numbered first, and not part of the prompt
            v = virtual.shape[1]
            mask = jnp.concatenate([jnp.ones((b, v), bool), mask], axis=1)
            prompt_mask = jnp.concatenate([jnp.zeros((b, v), bool), prompt_mask], axis=1)
            if position_ids is not None:
                position_ids = jnp.concatenate([jnp.broadcast_to(jnp.arange(v), (b, v)), position_ids + v], axis=1)
        if position_ids is not None:  # given for the real tokens alone: a prefix comes first (as PEFT shifts them)
            position_ids = position_ids + n_prefix
        t_all = mask.shape[1]
        size = t_all if cache is None else cache["mask"].shape[1]
        if size + n_prefix > s.max_positions:
            what = "sequence length" if cache is None else "cache size"
            added = 0 if virtual is None else virtual.shape[1]  # a cache's size already counts its virtual slots
            parts = "".join(f" + {n} {name}" for n, name in ((added, "virtual tokens"), (n_prefix, "prefix positions")) if n)
            raise ValueError(f"{what} {size - added}{parts} exceeds max_position_embeddings {s.max_positions}")
        if t_all > size:
            raise ValueError(f"{t_all} new tokens do not fit a cache of size {size}")
        index = 0 if cache is None else cache["index"]
        seen = mask if cache is None else jax.lax.dynamic_update_slice(cache["mask"], mask, (0, index))
        if position_ids is None:  # a prefix takes the first n_prefix positions, as transformers numbers them
            cumulative = jnp.maximum(jnp.cumsum(seen, axis=-1) - 1, 0) + n_prefix
            position_ids = jax.lax.dynamic_slice_in_dim(cumulative, index, t_all, axis=1)
        causal = jnp.arange(size)[None, :] <= (index + jnp.arange(t_all))[:, None]
        allowed = causal[None, None] & seen[:, None, None, :]
        ids = input_ids
        if ids is not None and virtual is not None:
            ids = jnp.concatenate([jnp.full((b, virtual.shape[1]), -1, ids.dtype), ids], axis=1)
        context = jhooks.Context(ids, prompt_mask, mask) if hooks else None
        hidden, layers = PhiModel(s, self.dtype, self.param_dtype, self.remat, name="model")(
            input_ids, inputs_embeds, position_ids, allowed, deterministic,
            None if cache is None else cache["layers"], index, prefix_kv, virtual, hooks or None, context,
        )
        if virtual is not None:  # logits of the real tokens only
            hidden = hidden[:, virtual.shape[1]:]
        logits = Linear(s.vocab_size, self.dtype, self.param_dtype, s.init_std, name="lm_head")(hidden, deterministic)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        return logits, {"layers": layers, "mask": seen, "index": index + t_all}


def init_cache(model: PhiForCausalLM, batch: int, size: int) -> dict:
    """An empty key/value cache for ``size`` positions (prompt + new tokens, and the virtual
    tokens of prompt or P-tuning: :func:`jpeft.hooks.num_virtual_tokens`), in ``model.dtype``.

    A pytree ``{"layers": [{"k", "v"} (batch, size, heads, head_dim) per layer],
    "mask": (batch, size) bool, "index": int32 next free slot}``. Writing past ``size``
    is not detected inside ``jit``: size it for the whole sequence.
    """
    s = model.spec
    zeros = lambda: jnp.zeros((batch, size, s.heads, s.head_dim), model.dtype)  # noqa: E731
    return {"layers": [{"k": zeros(), "v": zeros()} for _ in range(s.layers)],
            "mask": jnp.zeros((batch, size), bool), "index": jnp.zeros((), jnp.int32)}


def make_model(cfg: PhiConfig | dict | str, dtype: DType = jnp.float32, param_dtype: DType | None = None,
               remat: str = "none") -> PhiForCausalLM:
    """The Flax module for a ``PhiConfig``, a config dict or a config.json path.

    ``dtype`` is the compute dtype, ``param_dtype`` (default: ``dtype``) that of the weights;
    ``remat`` (a key of :data:`REMAT_POLICIES`) what each layer keeps for the backward pass.
    """
    check_remat(remat)
    return PhiForCausalLM(Spec.from_config(load_config(cfg)), dtype=jnp.dtype(dtype),
                          param_dtype=jnp.dtype(param_dtype or dtype), remat=remat)


def init(cfg: PhiConfig | dict | str, key: Array, dtype: DType = jnp.float32,
         param_dtype: DType | None = None) -> tuple[PhiForCausalLM, PyTree]:
    """``(model, params)`` with random weights (normal(initializer_range), zero biases, unit norms).

    Under ``jax.eval_shape`` it allocates nothing (count a full-size model's parameters).
    """
    model = make_model(cfg, dtype, param_dtype)
    return model, model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]


def param_shapes(model: PhiForCausalLM) -> PyTree:
    """The shapes and dtypes of ``model``'s parameters (``jax.eval_shape``: nothing is allocated)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])


# --------------------------------------------------------------- Hugging Face I/O


def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """Flax path -> (transformers tensor name, whether the array is transposed)."""
    *mods, leaf = path
    mods = [m.replace("layers_", "layers.") for m in mods]
    name = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join([*mods, name]), leaf == "kernel"


def _layout(model: PhiForCausalLM) -> dict[str, tuple[tuple[str, ...], jax.ShapeDtypeStruct, bool]]:
    """transformers tensor name -> (Flax path, Flax shape/dtype, transposed), nothing allocated."""
    return {name: (path, leaf, transposed) for path, leaf in flatten_dict(param_shapes(model)).items() for name, transposed in [hf_name(path)]}


def _checkpoint_files(directory: str) -> dict[str, str]:
    """tensor name -> safetensors file, from ``model.safetensors.index.json`` or ``model.safetensors``."""
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(directory, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(directory, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
    with safe_open(single, framework="flax") as f:
        return {k: single for k in f.keys()}


def _compare_names(where: str, wanted, found) -> None:
    missing, extra = sorted(set(wanted) - set(found)), sorted(set(found) - set(wanted))
    if missing or extra:
        raise ValueError(f"{where} does not match the configuration: missing tensors {missing}, unexpected tensors {extra}")


def from_pretrained(path_or_hub_id: str | os.PathLike, dtype: DType = jnp.float32,
                    param_dtype: DType | None = None, *, quantize: str | None = None, block_size: int = 64,
                    double_quant: bool | None = None) -> tuple[PhiForCausalLM, PyTree]:
    """Load a Hugging Face Phi checkpoint: a local directory, else a hub id (``snapshot_download``).

    Reads ``config.json`` and ``model.safetensors`` (or shards listed in
    ``model.safetensors.index.json``) one tensor at a time, casting each to
    ``param_dtype`` (default ``dtype``) as it arrives and transposing Linear weights to
    (in, out) kernels; bf16 checkpoints work. A missing, unexpected or mis-shaped tensor
    is a ValueError naming it (and the expected and found shapes).

    ``quantize`` (``"nf4"``, ``"fp4"``, ``"int8"``; see :func:`jpeft.quantize`, whose
    default targets it takes: every kernel but ``lm_head``) quantizes each kernel as it is
    read, so host memory peaks near the quantized model plus one tensor.
    """
    from safetensors import safe_open

    from jpeft import quantized

    directory = os.fspath(path_or_hub_id)
    if not os.path.isdir(directory) and (os.path.exists(directory) or directory.startswith(("/", ".", "~"))):
        raise FileNotFoundError(f"{directory} is not a checkpoint directory (config.json + *.safetensors)")
    if not os.path.isdir(directory):
        from huggingface_hub import snapshot_download

        directory = snapshot_download(directory, allow_patterns=["*.json", "*.safetensors"])
    model = make_model(directory, dtype, param_dtype)
    layout = _layout(model)
    quantized_paths = set()
    if quantize is not None:  # checked on the shapes, before any tensor is read
        double_quant = quantize != "int8" if double_quant is None else double_quant
        shapes = unflatten_dict({path: leaf for path, leaf, _ in layout.values()})
        quantized_paths = {tuple(p.split("/")) for p in quantized.checked_targets(shapes, quantize, None, block_size,
                                                                                  double_quant, None)}
    files = _checkpoint_files(directory)
    _compare_names(f"checkpoint {directory}", layout, files)
    by_file: dict[str, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    flat = {}
    for file, names in sorted(by_file.items()):
        with safe_open(file, framework="flax") as f:
            for name in names:
                path, leaf, transposed = layout[name]
                want = tuple(leaf.shape[::-1] if transposed else leaf.shape)
                found = tuple(f.get_slice(name).get_shape())
                if found != want:
                    raise ValueError(f"tensor {name} has shape {found}, expected {want}")
                tensor = jnp.asarray(f.get_tensor(name), leaf.dtype)
                flat[path] = tensor.T if transposed else tensor
                if path in quantized_paths:
                    flat[path] = quantized.quantize_kernel(flat[path], quantize, block_size=block_size,
                                                           double_quant=double_quant)
    return model, unflatten_dict(flat)


def save_pretrained(params: PyTree, cfg: PhiConfig | dict | str, path: str | os.PathLike) -> None:
    """Write ``config.json`` and ``model.safetensors`` that transformers' ``PhiForCausalLM`` loads.

    ``params`` must be plain arrays: adapted trees are refused (``jpeft.materialize`` first).
    With several processes every one calls this (arrays split over their devices are
    gathered) and process 0 writes.
    """
    from safetensors.flax import save_file

    flat = flatten_dict(params)
    if jhooks.KEY in params:
        raise ValueError(f"params hold methods that add computation ({sorted(params[jhooks.KEY])}), which no "
                         "checkpoint of the base architecture can hold; save them as a jpeft adapter instead")
    nodes = ["/".join(p) for p, leaf in flat.items() if is_node(leaf) or is_quantized(leaf)]
    if nodes:
        raise ValueError(f"params still hold jpeft nodes or quantized kernels at {nodes[:5]}; call "
                         "jpeft.materialize(params) first")
    cfg = copy.deepcopy(load_config(cfg))
    layout = _layout(make_model(cfg))
    names = {p: name for name, (p, _, _) in layout.items()}
    _compare_names("params", layout, [hf_name(p)[0] for p in flat])
    tensors = {}
    for p, leaf in flat.items():
        _, expected, transposed = layout[names[p]]
        if tuple(leaf.shape) != tuple(expected.shape):
            raise ValueError(f"{'/'.join(p)} has shape {tuple(leaf.shape)}, the configuration needs {tuple(expected.shape)}")
        host = sharding.host_array(leaf)  # gathered if split over several processes (all call this)
        tensors[names[p]] = jnp.asarray(host.T if transposed else host)
    if not sharding.is_primary():
        return
    cfg.architectures = ["PhiForCausalLM"]
    os.makedirs(path, exist_ok=True)
    cfg.save_pretrained(path)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------- generation


def _sample(logits: Array, key: Array, temperature: float, top_k: int | None, top_p: float | None) -> Array:
    """Next tokens from (batch, vocab) float32 logits: argmax at temperature 0, else HF's
    order temperature -> top-k -> top-p (nucleus, keeping at least one token)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        ranked = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # mass strictly before each token
        threshold = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "sampling", "eos", "pad", "start"), donate_argnames=("cache",))
def _decode_step(model, params, cache, tokens, mask, done, key, *, sampling, eos, pad, start):
    """Run ``tokens`` through the cache and pick the next token of each row (compiled once
    per model, shape and sampling setting: one program for the prompt, one per step)."""
    logits, cache = model.apply({"params": params}, tokens, mask, cache=cache, start=start)
    token = jnp.where(done, pad, _sample(logits[:, -1], key, *sampling))
    if eos:
        done = done | jnp.isin(token, jnp.asarray(eos))
    return token, cache, done


def generate(
    model: PhiForCausalLM,
    params: PyTree,
    input_ids: Array,
    attention_mask: Array | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    key: Array | None = None,
) -> Array:
    """Greedy (``temperature=0``) or sampled decoding over a fixed-size key/value cache.

    Prompts may be left-padded (``attention_mask``); right padding is a ValueError.
    ``params`` may be adapted (nodes), methods that add computation included: prompt and
    P-tuning's virtual tokens take the first cache slots, a prefix the first positions, and
    position-based interventions (LoReFT) act on the prompt's pass only, as PEFT and pyreft
    generate. Rows that produced an ``eos_token_id`` continue
    with ``pad_token_id`` (default: the first EOS id, else 0); decoding stops early once
    every row is done. Returns int32 (batch, prompt + max_new_tokens).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a key")
    if top_k is not None and top_k <= 0 or top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_k must be positive and top_p in (0, 1], got {top_k}, {top_p}")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    _check_shape("input_ids", input_ids, (None, None))
    b, t = input_ids.shape
    hooks = jhooks.split(params)[1]
    n_virtual, n_prefix = jhooks.num_virtual_tokens(hooks), jhooks.num_prefix_tokens(hooks)
    if n_virtual + n_prefix + t + max_new_tokens > model.spec.max_positions:
        extra = "".join(f" + {n} {name}" for n, name in ((n_virtual, "virtual tokens"), (n_prefix, "prefix positions")) if n)
        raise ValueError(f"prompt {t} + {max_new_tokens} new tokens{extra} exceed max_position_embeddings "
                         f"{model.spec.max_positions}")
    mask = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    _check_shape("attention_mask", mask, (b, t))
    if not bool(mask[:, -1].all()):
        raise ValueError("generate needs left-padded prompts: attention_mask[:, -1] must be 1 in every row")
    eos = () if eos_token_id is None else tuple(jnp.atleast_1d(jnp.asarray(eos_token_id)).tolist())
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    step = functools.partial(_decode_step, model, params, sampling=(float(temperature), top_k, top_p), eos=eos, pad=pad)
    key = jax.random.key(0) if key is None else key
    cache, done, out = init_cache(model, b, n_virtual + t + max_new_tokens), jnp.zeros((b,), bool), [input_ids]
    tokens = input_ids
    for i in range(max_new_tokens):
        token, cache, done = step(cache, tokens, mask, done, jax.random.fold_in(key, i), start=i == 0)
        tokens, mask = token[:, None], jnp.ones((b, 1), bool)
        out.append(tokens)
        if eos and i + 1 < max_new_tokens and bool(jnp.all(done)):
            out.append(jnp.full((b, max_new_tokens - i - 1), pad, jnp.int32))
            break
    return jnp.concatenate(out, axis=1)
