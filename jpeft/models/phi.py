"""Phi-1.5 (transformers' ``PhiForCausalLM``) in Flax, consuming jpeft nodes directly.

Architecture (DESIGN.md §5): a decoder-only transformer whose blocks are *parallel*,
``x + attn(ln(x)) + mlp(ln(x))`` with one LayerNorm, rotary embeddings on the first
``partial_rotary_factor`` of each head (rotate-half convention), ``gelu_new`` MLP, biases
on every linear layer including ``lm_head``, untied embeddings.

Every linear layer computes ``jpeft.linear(x, kernel) + bias``: the kernel may be a plain
(in, out) array or a jpeft node, whose factored path then runs. The parameter tree
mirrors transformers' names (``model/layers_0/self_attn/q_proj/kernel`` for
``model.layers.0.self_attn.q_proj.weight``), so jpeft's default targets select Q/K/V.

Matmuls run in ``dtype``; LayerNorm, softmax and logits in float32; parameters are
stored in ``param_dtype``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from transformers import PhiConfig

from jpeft.core import linear
from jpeft.node import is_node

Array = jax.Array
PyTree = Any

NAMED_CONFIGS = {
    "phi-1.5": dict(
        vocab_size=51200, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
        max_position_embeddings=2048, bos_token_id=50256, eos_token_id=50256,
    ),
    "tiny": dict(
        vocab_size=1024, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ),
}
_COMMON = dict(
    hidden_act="gelu_new", layer_norm_eps=1e-5, partial_rotary_factor=0.5, rope_theta=10000.0,
    resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False, qk_layernorm=False,
)


def config(name: str) -> PhiConfig:
    """A named configuration, known offline: ``"phi-1.5"`` (microsoft/phi-1_5) or ``"tiny"``."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown model configuration {name!r}; known: {sorted(NAMED_CONFIGS)}")
    return PhiConfig(**_COMMON, **NAMED_CONFIGS[name])


def _rope_value(cfg: PhiConfig, name: str, default):
    params = getattr(cfg, "rope_parameters", None) or {}
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

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_config(cls, cfg: PhiConfig) -> "Spec":
        if getattr(cfg, "qk_layernorm", False):
            raise NotImplementedError("Phi with qk_layernorm=True is not supported by jpeft.models.phi")
        if cfg.hidden_act != "gelu_new":
            raise NotImplementedError(f"hidden_act {cfg.hidden_act!r} is not supported (Phi uses gelu_new)")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by {cfg.num_attention_heads} heads")
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        if kv_heads != cfg.num_attention_heads:
            raise NotImplementedError("grouped-query attention (num_key_value_heads != num_attention_heads) is not supported")
        return cls(
            vocab_size=cfg.vocab_size, hidden=cfg.hidden_size, layers=cfg.num_hidden_layers,
            heads=cfg.num_attention_heads, intermediate=cfg.intermediate_size,
            rotary_dim=int(head_dim * _rope_value(cfg, "partial_rotary_factor", 0.5)),
            rope_theta=float(_rope_value(cfg, "rope_theta", 10000.0)), eps=cfg.layer_norm_eps,
            max_positions=cfg.max_position_embeddings, resid_pdrop=cfg.resid_pdrop, embd_pdrop=cfg.embd_pdrop,
            attention_dropout=cfg.attention_dropout, init_std=cfg.initializer_range,
        )


# ------------------------------------------------------------------------- modules


class Linear(nn.Module):
    """``jpeft.linear(x, kernel) + bias``; the kernel may be a jpeft node."""

    features: int
    dtype: Any
    param_dtype: Any
    init_std: float

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        if self.has_variable("params", "kernel"):  # may be a jpeft node: skip flax's shape check
            kernel = self.get_variable("params", "kernel")
        else:
            kernel = self.param("kernel", nn.initializers.normal(self.init_std), (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        wants_dropout = is_node(kernel) and getattr(kernel.config, "dropout", 0) > 0
        key = self.make_rng("dropout") if wants_dropout and not deterministic else None
        y = linear(x.astype(self.dtype), kernel, dropout_key=key)
        return y + bias.astype(y.dtype)


def rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rotary(x: Array, positions: Array, spec: Spec) -> Array:
    """Rotary embedding on the first ``rotary_dim`` features of each head (x: B, T, H, D)."""
    rd = spec.rotary_dim
    inv_freq = 1.0 / (spec.rope_theta ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    rot = x[..., :rd].astype(jnp.float32)
    rot = rot * jnp.cos(emb) + rotate_half(rot) * jnp.sin(emb)
    return jnp.concatenate([rot.astype(x.dtype), x[..., rd:]], axis=-1)


class Attention(nn.Module):
    spec: Spec
    dtype: Any
    param_dtype: Any

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
            k_all = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), (0, cache_index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), (0, cache_index, 0, 0))
            new_cache, k, v = {"k": k_all, "v": v_all}, k_all, v_all
        if prefix is not None:
            pk, pv = (jnp.swapaxes(p, 1, 2).astype(k.dtype) for p in prefix)  # (B, P, H, D)
            k, v = jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)
            allowed = jnp.concatenate([jnp.ones((*allowed.shape[:-1], pk.shape[1]), bool), allowed], axis=-1)
        scores = jnp.einsum("bthd,bshd->bhts", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(s.head_dim)
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(s.attention_dropout)(probs, deterministic=deterministic or s.attention_dropout == 0)
        out = jnp.einsum("bhts,bshd->bthd", probs.astype(self.dtype), v.astype(self.dtype)).reshape(b, t, s.hidden)
        return dense("dense")(out, deterministic), new_cache


class MLP(nn.Module):
    spec: Spec
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, deterministic):
        s = self.spec
        h = Linear(s.intermediate, self.dtype, self.param_dtype, s.init_std, name="fc1")(x, deterministic)
        h = jax.nn.gelu(h, approximate=True)
        return Linear(s.hidden, self.dtype, self.param_dtype, s.init_std, name="fc2")(h, deterministic)


class DecoderLayer(nn.Module):
    spec: Spec
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, positions, allowed, deterministic, layer_cache=None, cache_index=None, prefix=None):
        s = self.spec
        h = nn.LayerNorm(s.eps, dtype=jnp.float32, param_dtype=self.param_dtype, name="input_layernorm")(x)
        h = h.astype(self.dtype)
        attn, new_cache = Attention(s, self.dtype, self.param_dtype, name="self_attn")(
            h, positions, allowed, deterministic, layer_cache, cache_index, prefix
        )
        mlp = MLP(s, self.dtype, self.param_dtype, name="mlp")(h, deterministic)
        drop = nn.Dropout(s.resid_pdrop)
        det = deterministic or s.resid_pdrop == 0
        return x + (drop(attn, deterministic=det) + drop(mlp, deterministic=det)).astype(x.dtype), new_cache


class PhiModel(nn.Module):
    spec: Spec
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, input_ids, inputs_embeds, positions, allowed, deterministic, cache=None, cache_index=None, prefix_kv=None):
        s = self.spec
        embed = nn.Embed(s.vocab_size, s.hidden, param_dtype=self.param_dtype,
                         embedding_init=nn.initializers.normal(s.init_std), name="embed_tokens")
        x = embed(input_ids) if inputs_embeds is None else inputs_embeds
        x = nn.Dropout(s.embd_pdrop)(x.astype(self.dtype), deterministic=deterministic or s.embd_pdrop == 0)
        new_caches = []
        for i in range(s.layers):
            x, c = DecoderLayer(s, self.dtype, self.param_dtype, name=f"layers_{i}")(
                x, positions, allowed, deterministic,
                None if cache is None else cache[i], cache_index, None if prefix_kv is None else prefix_kv[i],
            )
            new_caches.append(c)
        x = nn.LayerNorm(s.eps, dtype=jnp.float32, param_dtype=self.param_dtype, name="final_layernorm")(x)
        return x.astype(self.dtype), new_caches


class PhiForCausalLM(nn.Module):
    """``__call__(input_ids, attention_mask=None, position_ids=None, *, inputs_embeds=None,
    prefix_kv=None, cache=None, deterministic=True)``.

    Returns float32 logits (batch, length, vocab), or ``(logits, cache)`` when a cache
    from :func:`init_cache` is given. ``attention_mask`` (batch, length) marks real
    tokens (left or right padding); default position ids count real tokens
    (``cumsum(mask) - 1``). ``prefix_kv[i] = (key, value)``, each (batch, heads,
    prefix, head_dim), is attended to by every position of layer ``i``.
    """

    spec: Spec
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, *, inputs_embeds=None,
                 prefix_kv=None, cache=None, deterministic: bool = True):
        s = self.spec
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        b, t = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        if prefix_kv is not None and len(prefix_kv) != s.layers:
            raise ValueError(f"prefix_kv has {len(prefix_kv)} entries, the model has {s.layers} layers")
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if cache is None:
            if t > s.max_positions:
                raise ValueError(f"sequence length {t} exceeds max_position_embeddings {s.max_positions}")
            if position_ids is None:
                position_ids = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
            causal = jnp.tril(jnp.ones((t, t), bool))
            allowed = causal[None, None] & mask[:, None, None, :]
            hidden, _ = PhiModel(s, self.dtype, self.param_dtype, name="model")(
                input_ids, inputs_embeds, position_ids, allowed, deterministic, prefix_kv=prefix_kv
            )
            new_cache = None
        else:
            index = cache["index"]
            kv_mask = jax.lax.dynamic_update_slice(cache["mask"], mask, (0, index))
            if position_ids is None:
                position_ids = jnp.maximum(jnp.cumsum(kv_mask, axis=-1) - 1, 0)
                position_ids = jax.lax.dynamic_slice_in_dim(position_ids, index, t, axis=1)
            slots = jnp.arange(kv_mask.shape[1])
            causal = slots[None, :] <= (index + jnp.arange(t))[:, None]
            allowed = causal[None, None] & kv_mask[:, None, None, :]
            hidden, layers = PhiModel(s, self.dtype, self.param_dtype, name="model")(
                input_ids, inputs_embeds, position_ids, allowed, deterministic, cache["layers"], index, prefix_kv
            )
            new_cache = {"layers": layers, "mask": kv_mask, "index": index + t}
        logits = Linear(s.vocab_size, self.dtype, self.param_dtype, s.init_std, name="lm_head")(hidden, deterministic)
        logits = logits.astype(jnp.float32)
        return logits if new_cache is None else (logits, new_cache)


def init_cache(model: PhiForCausalLM, batch: int, length: int) -> dict:
    """An empty key/value cache holding ``length`` positions."""
    s = model.spec
    zeros = lambda: jnp.zeros((batch, length, s.heads, s.head_dim), model.dtype)  # noqa: E731
    return {"layers": [{"k": zeros(), "v": zeros()} for _ in range(s.layers)],
            "mask": jnp.zeros((batch, length), bool), "index": jnp.zeros((), jnp.int32)}


def load_config(cfg) -> PhiConfig:
    """A ``PhiConfig`` from itself, a dict, a config.json path or a checkpoint directory."""
    if isinstance(cfg, PhiConfig):
        return cfg
    if isinstance(cfg, dict):
        return PhiConfig(**cfg)
    path = os.path.join(cfg, "config.json") if os.path.isdir(cfg) else cfg
    with open(path) as f:
        return PhiConfig(**json.load(f))


def make_model(cfg, dtype=jnp.float32, param_dtype=None) -> PhiForCausalLM:
    """The Flax module for a ``PhiConfig``, a config dict or a config.json path."""
    return PhiForCausalLM(Spec.from_config(load_config(cfg)), dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype or dtype))


def init(cfg, key: Array, dtype=jnp.float32, param_dtype=None) -> tuple[PhiForCausalLM, PyTree]:
    """``(model, params)`` with random weights (normal(initializer_range), zero biases)."""
    model = make_model(cfg, dtype, param_dtype)
    params = model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]
    return model, params


# --------------------------------------------------------------- Hugging Face I/O


def _hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """Flax path -> (transformers tensor name, whether the array is transposed)."""
    *mods, leaf = path
    mods = [m.replace("layers_", "layers.") if m.startswith("layers_") else m for m in mods]
    name = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return ".".join([*mods, name]), leaf == "kernel"


def _flat_paths(tree) -> dict[tuple[str, ...], Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)
    return {tuple(str(getattr(k, "key", k)) for k in p): leaf for p, leaf in flat}


def _checkpoint_files(directory: str) -> dict[str, str]:
    """tensor name -> safetensors file, from an index or a single file."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(directory, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(directory, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
    from safetensors import safe_open

    with safe_open(single, framework="flax") as f:
        return {k: single for k in f.keys()}


def from_pretrained(path_or_hub_id: str, dtype=jnp.float32, param_dtype=None) -> tuple[PhiForCausalLM, PyTree]:
    """Load a Hugging Face Phi checkpoint (local directory, or hub id where reachable).

    Tensors are read one at a time and cast to ``param_dtype`` as they arrive, so the
    host holds about one copy of the model in that dtype. A missing, unexpected or
    mis-shaped tensor is a ValueError naming it.
    """
    from safetensors import safe_open

    directory = path_or_hub_id
    if not os.path.isdir(directory):
        from huggingface_hub import snapshot_download

        directory = snapshot_download(path_or_hub_id, allow_patterns=["*.json", "*.safetensors"])
    model = make_model(directory, dtype, param_dtype)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    expected = {_hf_name(p): leaf for p, leaf in _flat_paths(shapes).items()}
    files = _checkpoint_files(directory)
    wanted = {name for name, _ in expected}
    missing, extra = sorted(wanted - set(files)), sorted(set(files) - wanted)
    if missing or extra:
        raise ValueError(f"checkpoint {directory} does not match the configuration: missing tensors {missing}, unexpected tensors {extra}")
    loaded = {}
    handles: dict[str, Any] = {}
    try:
        for (name, transposed), leaf in expected.items():
            if files[name] not in handles:
                handles[files[name]] = safe_open(files[name], framework="flax").__enter__()
            tensor = handles[files[name]].get_tensor(name)
            tensor = tensor.T if transposed else tensor
            if tuple(tensor.shape) != tuple(leaf.shape):
                found = tuple(tensor.T.shape) if transposed else tuple(tensor.shape)
                want = tuple(leaf.shape[::-1]) if transposed else tuple(leaf.shape)
                raise ValueError(f"tensor {name} has shape {found}, expected {want}")
            loaded[name] = jnp.asarray(tensor, leaf.dtype)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    flat = [loaded[_hf_name(p)[0]] for p in _flat_paths(shapes)]
    return model, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), flat)


def save_pretrained(params: PyTree, cfg, path: str) -> None:
    """Write ``config.json`` and ``model.safetensors`` that transformers' ``PhiForCausalLM`` loads."""
    from safetensors.flax import save_file

    flat = _flat_paths(params)
    nodes = [p for p, leaf in flat.items() if is_node(leaf)]
    if nodes:
        raise ValueError(f"params still hold jpeft nodes at {['/'.join(p) for p in nodes[:5]]}; call jpeft.materialize(params) first")
    os.makedirs(path, exist_ok=True)
    load_config(cfg).save_pretrained(path)
    tensors = {}
    for p, leaf in flat.items():
        name, transposed = _hf_name(p)
        tensors[name] = jnp.asarray(leaf.T if transposed else leaf)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------- generation


def _sample(logits: Array, key, temperature: float, top_k: int | None, top_p: float | None) -> Array:
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        drop_sorted = cumulative - jax.nn.softmax(sorted_logits, axis=-1) >= top_p  # keep the first token always
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


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
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    key: Array | None = None,
) -> Array:
    """Greedy (``temperature=0``) or sampled decoding with a key/value cache.

    Prompts may be left-padded (``attention_mask``). Rows that produced ``eos_token_id``
    continue with ``pad_token_id`` (default: the EOS id). Returns (batch, prompt + new).
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a key")
    if top_k is not None and top_k <= 0 or top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_k must be positive and top_p in (0, 1], got {top_k}, {top_p}")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    b, t = input_ids.shape
    if t + max_new_tokens > model.spec.max_positions:
        raise ValueError(f"prompt {t} + {max_new_tokens} new tokens exceed max_position_embeddings {model.spec.max_positions}")
    mask = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    key = jax.random.key(0) if key is None else key
    cache = init_cache(model, b, t + max_new_tokens)

    @jax.jit
    def prefill(params, cache, ids, mask):
        logits, cache = model.apply({"params": params}, ids, mask, cache=cache)
        return logits[:, -1], cache

    @jax.jit
    def decode(params, cache, token, step_key):
        logits, cache = model.apply({"params": params}, token[:, None], jnp.ones((b, 1), bool), cache=cache)
        return logits[:, -1], cache

    logits, cache = prefill(params, cache, input_ids, mask)
    done = jnp.zeros((b,), bool)
    out = []
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token = _sample(logits, sub, temperature, top_k, top_p)
        token = jnp.where(done, pad, token)
        out.append(token)
        if eos_token_id is not None:
            done = done | (token == eos_token_id)
            if bool(jnp.all(done)):
                out += [jnp.full((b,), pad, jnp.int32)] * (max_new_tokens - i - 1)
                break
        if i + 1 < max_new_tokens:
            logits, cache = decode(params, cache, token, sub)
    return jnp.concatenate([input_ids, jnp.stack(out, axis=1)], axis=1)
