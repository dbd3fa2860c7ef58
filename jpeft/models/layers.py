"""What the decoder ports share: layers, rotary embeddings, causal attention with its cache
and prefix, the hook calls, the causal-LM wrapper, Hugging Face checkpoint I/O and decoding.

A family (:mod:`jpeft.models.phi`, :mod:`jpeft.models.llama`) contributes only what is its
own: reading its configuration into a :class:`Spec`, its MLP and its decoder layer (how the
sublayers join the residual stream). Everything else is here, once:

- :class:`Linear` computes ``jpeft.linear(x, kernel) (+ bias)``; the kernel may be a plain
  (in, out) array, a jpeft node (its factored path runs) or a quantized kernel.
- :func:`rope_frequencies` gives the rotary inverse frequencies of transformers' ``default``,
  ``linear`` and ``llama3`` RoPE types; :func:`rotary` applies them (rotate-half convention)
  to the first ``2 * len(inv_freq)`` features of each head.
- :class:`Attention` is grouped-query causal attention (``kv_heads`` dividing ``heads``; each
  key/value head serves ``heads // kv_heads`` query heads, as transformers' ``repeat_kv``),
  writing new keys and values into a fixed-size cache and attending a per-layer prefix.
- :class:`CausalLM` takes the ids (or embeddings), masks, positions, the cache and the nodes
  of the methods that add computation (:mod:`jpeft.hooks`), runs the family's layers and
  returns float32 logits.

Parameter paths mirror transformers' module names (``model/layers_0/self_attn/q_proj/kernel``
for ``model.layers.0.self_attn.q_proj.weight``): :func:`hf_name` is the whole mapping.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jpeft import hooks as jhooks, quantized, sharding
from jpeft.core import linear, resolve_full, uses_dropout
from jpeft.node import is_node, is_quantized

Array = jax.Array
PyTree = Any
DType = Any


# --------------------------------------------------------------------------- spec


@dataclasses.dataclass(frozen=True)
class Spec:
    """The static, hashable facts of a configuration that the Flax modules need.

    ``norm`` is ``"layer"`` (LayerNorm with bias, Phi) or ``"rms"`` (RMSNorm, Llama);
    ``inv_freq`` the rotary inverse frequencies (their count times two is the rotated width
    of a head); ``out_proj`` the attention output projection's name; ``sliding_window`` the
    number of most recent positions (itself included) a token attends to, or ``None``.
    """

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    inv_freq: tuple[float, ...]
    eps: float
    max_positions: int
    init_std: float
    norm: str
    out_proj: str
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    lm_head_bias: bool
    tie_embeddings: bool = False
    attention_dropout: float = 0.0
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    sliding_window: int | None = None
    special_token_ids: tuple[int, ...] = ()

    @property
    def rotary_dim(self) -> int:
        """The rotated width of a head."""
        return 2 * len(self.inv_freq)

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.heads} attention heads are not a multiple of {self.kv_heads} key/value heads")
        if self.norm not in ("layer", "rms"):
            raise ValueError(f"norm must be 'layer' or 'rms', got {self.norm!r}")


def special_token_ids(cfg) -> tuple[int, ...]:
    """The sorted BOS / EOS / PAD ids a transformers config names (lists of ids included)."""
    ids = set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(cfg, name, None)
        ids.update(i for i in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(i, int))
    return tuple(sorted(ids))


def rope_settings(cfg) -> dict:
    """The RoPE settings of a transformers config, 4.x (``rope_theta``, ``rope_scaling``) or 5
    (``rope_parameters``) alike: ``{"rope_type", "rope_theta", ...scaling fields}``."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", getattr(cfg, "rope_theta", None) or 10000.0)
    for name in ("partial_rotary_factor",):
        if name not in params and getattr(cfg, name, None) is not None:
            params[name] = getattr(cfg, name)
    return params


ROPE_TYPES = ("default", "linear", "llama3")


def rope_frequencies(rotary_dim: int, settings: dict) -> tuple[float, ...]:
    """Rotary inverse frequencies ``θ^(-2i/d)``, ``i < d/2``, in float32 as transformers computes
    them, scaled by ``settings["rope_type"]``:

    - ``default``: as is (Su et al., *RoFormer*, 2021);
    - ``linear``: divided by ``factor`` (position interpolation, Chen et al., 2023);
    - ``llama3``: frequencies whose wavelength exceeds ``original_max_position_embeddings /
      low_freq_factor`` divided by ``factor``, those below ``… / high_freq_factor`` kept, and a
      linear blend between (Meta's Llama 3.1).
    """
    kind = settings.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise NotImplementedError(f"rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    theta = np.float32(settings.get("rope_theta", 10000.0))
    inv = (np.float32(1.0) / theta ** (np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32)
                                       / np.float32(rotary_dim))).astype(np.float32)
    if kind == "linear":
        inv = inv / np.float32(settings["factor"])
    elif kind == "llama3":
        factor, low, high = (float(settings[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        old = float(settings["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv = np.where(medium, blended, scaled).astype(np.float32)
    return tuple(float(f) for f in inv)


def check_shape(name: str, x: Any, shape: tuple) -> None:
    """ValueError unless ``x.shape`` matches ``shape`` (``None`` entries match anything)."""
    found = tuple(getattr(x, "shape", ()))
    if len(found) != len(shape) or any(w is not None and w != f for w, f in zip(shape, found)):
        want = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {found}")


# ------------------------------------------------------------------------ modules


class Linear(nn.Module):
    """``jpeft.linear(x, kernel) (+ bias)``; the kernel may be a jpeft node.

    flax's ``self.param`` checks an existing value's first leaf against the declared
    shape, which a node (whose leaves are its factors) fails; a node is therefore read
    with ``get_variable`` and checked against its own ``shape``.
    """

    features: int
    dtype: DType
    param_dtype: DType
    init_std: float
    use_bias: bool = True

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
        key = self.make_rng("dropout") if uses_dropout(kernel) and not deterministic else None
        y = linear(x.astype(self.dtype), kernel, dropout_key=key)
        if not self.use_bias:
            return y
        return y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(y.dtype)


class RMSNorm(nn.Module):
    """``scale ⊙ x / sqrt(mean(x²) + eps)`` (Zhang & Sennrich, 2019), normalized in float32 and
    cast back before the scale, as transformers' ``LlamaRMSNorm``."""

    eps: float
    param_dtype: DType

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return scale * h.astype(x.dtype)


def norm(spec: Spec, param_dtype: DType, name: str) -> nn.Module:
    """The family's normalization layer (:attr:`Spec.norm`), computed in float32 for LayerNorm."""
    if spec.norm == "rms":
        return RMSNorm(spec.eps, param_dtype, name=name)
    return nn.LayerNorm(spec.eps, dtype=jnp.float32, param_dtype=param_dtype, use_fast_variance=False, name=name)


def rotary(x: Array, positions: Array, inv_freq: Sequence[float]) -> Array:
    """Rotary embedding (transformers' rotate-half) on the first ``2 * len(inv_freq)`` features
    of each head. ``x``: (batch, length, heads, head_dim); ``positions``: (batch, length)."""
    rd = 2 * len(inv_freq)  # Spec.rotary_dim
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    rot = x[..., :rd].astype(jnp.float32)
    half = jnp.concatenate([-rot[..., rd // 2:], rot[..., : rd // 2]], axis=-1)
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
    """Causal grouped-query self-attention with rotary positions, a key/value cache and a prefix.

    ``allowed`` (batch, 1, length, keys) says which cache slots (or, without a cache, which
    tokens) each query attends; a prefix's positions are attended by every query.
    """

    spec: Spec
    dtype: DType
    param_dtype: DType

    @nn.compact
    def __call__(self, x, positions, allowed, deterministic, layer_cache=None, cache_index=None, prefix=None):
        s = self.spec
        dense = lambda n, width, bias: Linear(width, self.dtype, self.param_dtype, s.init_std, bias, name=n)  # noqa: E731
        b, t, _ = x.shape
        group = s.heads // s.kv_heads
        q = dense("q_proj", s.heads * s.head_dim, s.qkv_bias)(x, deterministic).reshape(b, t, s.heads, s.head_dim)
        k = dense("k_proj", s.kv_heads * s.head_dim, s.qkv_bias)(x, deterministic).reshape(b, t, s.kv_heads, s.head_dim)
        v = dense("v_proj", s.kv_heads * s.head_dim, s.qkv_bias)(x, deterministic).reshape(b, t, s.kv_heads, s.head_dim)
        q, k = rotary(q, positions, s.inv_freq), rotary(k, positions, s.inv_freq)
        new_cache = None
        if layer_cache is not None:
            k, v = (jax.lax.dynamic_update_slice(layer_cache[n], y.astype(layer_cache[n].dtype), (0, cache_index, 0, 0))
                    for n, y in (("k", k), ("v", v)))
            new_cache = {"k": k, "v": v}
        if prefix is not None:
            pk, pv = (jnp.swapaxes(p, 1, 2).astype(k.dtype) for p in prefix)  # (B, P, kv heads, D)
            k, v = jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)
            allowed = jnp.concatenate([jnp.ones((*allowed.shape[:-1], pk.shape[1]), bool), allowed], axis=-1)
        # query head h reads key/value head h // group
        q = q.reshape(b, t, s.kv_heads, group, s.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = jnp.where(allowed[:, :, None], scores / math.sqrt(s.head_dim), jnp.finfo(jnp.float32).min)
        probs = nn.Dropout(s.attention_dropout)(jax.nn.softmax(scores, axis=-1), deterministic=deterministic)
        out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(self.dtype), v.astype(self.dtype))
        out = out.reshape(b, t, s.heads * s.head_dim)
        return dense(s.out_proj, s.hidden, s.out_bias)(out, deterministic), new_cache


def layer_hooks(module: nn.Module, hooks: dict | None, index: int, context, deterministic: bool) -> Callable:
    """``hook(site, out, inp)``: ``out`` after the residual hooks of ``site`` in layer ``index``
    (:func:`jpeft.hooks.residual`); the identity without hooks. Each site draws its own key."""
    if not hooks:
        return lambda site, out, inp: out
    key = module.make_rng("dropout") if not deterministic and jhooks.uses_key(hooks) else None

    def hook(site: str, out: Array, inp: Array) -> Array:
        k = None if key is None else jax.random.fold_in(key, jhooks.SITES.index(site))
        return jhooks.residual(hooks, index, site, out, inp, context, k)

    return hook


class Block(nn.Module):
    """A decoder layer: a family subclasses it with a compact ``__call__(x, positions, allowed,
    deterministic, layer_cache=None, cache_index=None, prefix=None, hooks=None, context=None)
    -> (x, new_layer_cache)`` that starts with :meth:`attend`."""

    spec: Spec
    dtype: DType
    param_dtype: DType
    index: int = 0

    def attend(self, x, positions, allowed, deterministic, layer_cache, cache_index, prefix, hooks, context):
        """What every port's layer does first: the ``"input"`` hook, ``input_layernorm`` and
        self-attention. Returns ``(hook, x, h, attn, new_cache)``: the layer's hook function
        (:func:`layer_hooks`), the stream after the input hook, its normalized copy (in the
        compute dtype), the attention output before it joins the stream, and the new cache."""
        hook = layer_hooks(self, hooks, self.index, context, deterministic)
        x = hook("input", x, x)
        h = norm(self.spec, self.param_dtype, "input_layernorm")(x).astype(self.dtype)
        attn, new_cache = Attention(self.spec, self.dtype, self.param_dtype, name="self_attn")(
            h, positions, allowed, deterministic, layer_cache, cache_index, prefix)
        return hook, x, h, attn, new_cache


class Decoder(nn.Module):
    """Token embedding, the family's decoder layers and the final norm (the ``model`` subtree)."""

    spec: Spec
    layer: type
    final_norm: str
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
        layer = self.layer if self.remat == "none" else nn.remat(  # deterministic (argument 4) is static
            self.layer, static_argnums=(4,), policy=REMAT_POLICIES[self.remat])
        for i in range(s.layers):
            x, c = layer(s, self.dtype, self.param_dtype, i, name=f"layers_{i}")(
                x, positions, allowed, deterministic,
                None if cache is None else cache[i], cache_index, None if prefix_kv is None else prefix_kv[i],
                hooks, context,
            )
            new_caches.append(c)
        x = norm(s, self.param_dtype, self.final_norm)(x)
        return x.astype(self.dtype), new_caches, embed.embedding if s.tie_embeddings else None


class CausalLM(nn.Module):
    """A decoder-only causal LM; ``apply({"params": params}, input_ids, attention_mask=None, ...)``.

    A family subclasses it, naming its decoder layer (``Layer``, a :class:`Block`) and its
    final norm's name.
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
      prefix_kv: one ``(key, value)`` per layer, each (batch, key/value heads, prefix,
        head_dim), used as is (no rotary) and attended to by every position; the prefix
        takes the first positions (a prefix-tuning node gives it from the parameters instead).
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

    Layer: ClassVar[type]
    final_norm: ClassVar[str]

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
        """The hook protocol's description of this model: every hook point is implemented
        (prefixes have the key/value heads)."""
        s = self.spec
        return jhooks.ModelDims(hidden=s.hidden, layers=s.layers, heads=s.kv_heads, head_dim=s.head_dim,
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
            check_shape("input_ids", input_ids, (None, None))
            if not jnp.issubdtype(input_ids.dtype, jnp.integer):
                raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
            b, t = input_ids.shape
        else:
            check_shape("inputs_embeds", inputs_embeds, (None, None, s.hidden))
            b, t = inputs_embeds.shape[:2]
        for name, x in (("attention_mask", attention_mask), ("position_ids", position_ids), ("prompt_mask", prompt_mask)):
            if x is not None:
                check_shape(name, x, (b, t))
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
                    check_shape(f"prefix_kv[{i}] {part}", x, (b, s.kv_heads, p, s.head_dim))
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
        slots, queries = jnp.arange(size)[None, :], (index + jnp.arange(t_all))[:, None]
        causal = slots <= queries
        if s.sliding_window is not None:  # the window counts slots, as transformers counts cache positions
            causal = causal & (queries - slots < s.sliding_window)
        allowed = causal[None, None] & seen[:, None, None, :]
        ids = input_ids
        if ids is not None and virtual is not None:
            ids = jnp.concatenate([jnp.full((b, virtual.shape[1]), -1, ids.dtype), ids], axis=1)
        context = jhooks.Context(ids, prompt_mask, mask) if hooks else None
        hidden, layers, tied = Decoder(s, self.Layer, self.final_norm, self.dtype, self.param_dtype, self.remat,
                                       name="model")(
            input_ids, inputs_embeds, position_ids, allowed, deterministic,
            None if cache is None else cache["layers"], index, prefix_kv, virtual, hooks or None, context,
        )
        if virtual is not None:  # logits of the real tokens only
            hidden = hidden[:, virtual.shape[1]:]
        if tied is None:
            logits = Linear(s.vocab_size, self.dtype, self.param_dtype, s.init_std, s.lm_head_bias, name="lm_head")(
                hidden, deterministic)
        else:  # the output projection is the token embedding
            logits = jnp.einsum("btd,vd->btv", hidden, tied.astype(self.dtype), preferred_element_type=jnp.float32)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        return logits, {"layers": layers, "mask": seen, "index": index + t_all}


def build(cls: type, spec: Spec, dtype: DType = jnp.float32, param_dtype: DType | None = None,
          remat: str = "none") -> CausalLM:
    """A port's module: ``dtype`` the compute dtype, ``param_dtype`` (default ``dtype``) that of
    the weights, ``remat`` (a key of :data:`REMAT_POLICIES`) what each layer keeps for backward."""
    check_remat(remat)
    return cls(spec, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype or dtype), remat=remat)


def init_cache(model: CausalLM, batch: int, size: int) -> dict:
    """An empty key/value cache for ``size`` positions (prompt + new tokens, and the virtual
    tokens of prompt or P-tuning: :func:`jpeft.hooks.num_virtual_tokens`), in ``model.dtype``.

    A pytree ``{"layers": [{"k", "v"} (batch, size, kv heads, head_dim) per layer],
    "mask": (batch, size) bool, "index": int32 next free slot}``. Writing past ``size``
    is not detected inside ``jit``: size it for the whole sequence.
    """
    s = model.spec
    zeros = lambda: jnp.zeros((batch, size, s.kv_heads, s.head_dim), model.dtype)  # noqa: E731
    return {"layers": [{"k": zeros(), "v": zeros()} for _ in range(s.layers)],
            "mask": jnp.zeros((batch, size), bool), "index": jnp.zeros((), jnp.int32)}


def param_shapes(model: CausalLM) -> PyTree:
    """The shapes and dtypes of ``model``'s parameters (``jax.eval_shape``: nothing is allocated)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])


def init_params(model: CausalLM, key: Array) -> PyTree:
    """Random weights (normal(initializer_range), zero biases, unit norms); under
    ``jax.eval_shape`` nothing is allocated. Jitted: one compile instead of one per operation."""
    return jax.jit(lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32))["params"])(key)


# --------------------------------------------------------------- Hugging Face I/O


def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """Flax path -> (transformers tensor name, whether the array is transposed)."""
    *mods, leaf = path
    mods = [m.replace("layers_", "layers.") for m in mods]
    name = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join([*mods, name]), leaf == "kernel"


def layout(model: CausalLM) -> dict[str, tuple[tuple[str, ...], jax.ShapeDtypeStruct, bool]]:
    """transformers tensor name -> (Flax path, Flax shape/dtype, transposed), nothing allocated."""
    return {name: (path, leaf, transposed) for path, leaf in flatten_dict(param_shapes(model)).items()
            for name, transposed in [hf_name(path)]}


#: tensors a checkpoint may hold that the port derives instead (old Llama files keep the rotary frequencies)
_DERIVED = ("rotary_emb.inv_freq",)


def _compare_names(where: str, wanted, found) -> None:
    missing, extra = sorted(set(wanted) - set(found)), sorted(set(found) - set(wanted))
    if missing or extra:
        raise ValueError(f"{where} does not match the configuration: missing tensors {missing}, unexpected tensors {extra}")


def checkpoint_directory(path_or_hub_id: str | os.PathLike) -> str:
    """A local checkpoint directory, else a hub id fetched with ``snapshot_download``."""
    directory = os.fspath(path_or_hub_id)
    if not os.path.isdir(directory) and (os.path.exists(directory) or directory.startswith(("/", ".", "~"))):
        raise FileNotFoundError(f"{directory} is not a checkpoint directory (config.json + *.safetensors)")
    if not os.path.isdir(directory):
        from huggingface_hub import snapshot_download

        directory = snapshot_download(directory, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    return directory


def read_config(cfg: dict | str | os.PathLike) -> dict:
    """A config dict from itself, a config.json path or a checkpoint directory."""
    if isinstance(cfg, dict):
        return cfg
    path = os.path.join(cfg, "config.json") if os.path.isdir(cfg) else cfg
    with open(path) as f:
        return json.load(f)


def safetensors_tensors(directory: str) -> tuple[list[str], Callable[[], Iterator[tuple[str, np.ndarray]]]]:
    """``(names, read)`` of a checkpoint directory's ``model.safetensors`` (or the shards listed
    in ``model.safetensors.index.json``): the names at once, ``read()`` the tensors one at a time."""
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = {k: os.path.join(directory, v) for k, v in json.load(f)["weight_map"].items()}
    else:
        single = os.path.join(directory, "model.safetensors")
        if not os.path.exists(single):
            raise FileNotFoundError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
        with safe_open(single, framework="numpy") as f:
            files = {k: single for k in f.keys()}

    def read() -> Iterator[tuple[str, np.ndarray]]:
        by_file: dict[str, list[str]] = {}
        for name, file in files.items():
            by_file.setdefault(file, []).append(name)
        for file, names in sorted(by_file.items()):
            with safe_open(file, framework="flax") as f:  # flax: bf16 tensors arrive as bf16
                for name in names:
                    yield name, f.get_tensor(name)

    return list(files), read


def load_tensors(model: CausalLM, names: Iterable[str], tensors: Iterable[tuple[str, Any]], where: str, *,
                 quantize: str | None = None, block_size: int = 64, double_quant: bool | None = None) -> PyTree:
    """Parameters from transformers-named tensors in PyTorch's layout, checked against ``model``.

    ``names`` (all of them, before any is read) must be exactly the model's tensors (a
    tied ``lm_head.weight`` and derived rotary frequencies are ignored): a missing or
    unexpected one is a ValueError naming it and ``where``. Each tensor is cast to the
    model's ``param_dtype`` as it arrives, Linear weights transposed to (in, out) kernels;
    a mis-shaped one is a ValueError with both shapes. ``quantize`` (``"nf4"``, ``"fp4"``,
    ``"int8"``; :func:`jpeft.quantize`'s default targets, every kernel but ``lm_head``)
    quantizes each kernel as it is read, so host memory peaks near the quantized model plus
    one tensor.
    """
    shapes = layout(model)
    skipped = lambda n: n.endswith(_DERIVED) or (model.spec.tie_embeddings and n == "lm_head.weight")  # noqa: E731
    _compare_names(where, shapes, [n for n in names if not skipped(n)])
    quantized_paths = set()
    if quantize is not None:  # checked on the shapes, before any tensor is read
        double_quant = quantize != "int8" if double_quant is None else double_quant
        tree = unflatten_dict({path: leaf for path, leaf, _ in shapes.values()})
        quantized_paths = {tuple(p.split("/")) for p in quantized.checked_targets(tree, quantize, None, block_size,
                                                                                  double_quant, None)}
    flat = {}
    for name, tensor in tensors:
        if skipped(name):
            continue
        path, leaf, transposed = shapes[name]
        want = tuple(leaf.shape[::-1] if transposed else leaf.shape)
        if tuple(tensor.shape) != want:
            raise ValueError(f"{where}: tensor {name} has shape {tuple(tensor.shape)}, expected {want}")
        tensor = jnp.asarray(tensor, leaf.dtype)
        flat[path] = tensor.T if transposed else tensor
        if path in quantized_paths:
            flat[path] = quantized.quantize_kernel(flat[path], quantize, block_size=block_size, double_quant=double_quant)
    return unflatten_dict(flat)


def hf_tensors(params: PyTree, model: CausalLM) -> dict[str, Array]:
    """transformers-named tensors (PyTorch layout) of plain ``params``; adapted or quantized
    trees are refused. With several processes every one calls this (arrays split over their
    devices are gathered)."""
    if jhooks.KEY in params:
        raise ValueError(f"params hold methods that add computation ({sorted(params[jhooks.KEY])}), which no "
                         "checkpoint of the base architecture can hold; save them as a jpeft adapter instead")
    flat = flatten_dict(params)
    nodes = ["/".join(p) for p, leaf in flat.items() if is_node(leaf) or is_quantized(leaf)]
    if nodes:
        raise ValueError(f"params still hold jpeft nodes or quantized kernels at {nodes[:5]}; call "
                         "jpeft.materialize(params) first")
    shapes = layout(model)
    names = {p: name for name, (p, _, _) in shapes.items()}
    _compare_names("params", shapes, [hf_name(p)[0] for p in flat])
    tensors = {}
    for p, leaf in flat.items():
        _, expected, transposed = shapes[names[p]]
        if tuple(leaf.shape) != tuple(expected.shape):
            raise ValueError(f"{'/'.join(p)} has shape {tuple(leaf.shape)}, the configuration needs {tuple(expected.shape)}")
        host = sharding.host_array(leaf)  # gathered if split over several processes (all call this)
        tensors[names[p]] = jnp.asarray(host.T if transposed else host)
    return tensors


def write_checkpoint(tensors: dict[str, Array], hf_config, path: str | os.PathLike) -> None:
    """``config.json`` and ``model.safetensors`` in ``path`` (process 0 writes)."""
    from safetensors.flax import save_file

    if not sharding.is_primary():
        return
    os.makedirs(path, exist_ok=True)
    hf_config.save_pretrained(path)
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
    model: CausalLM,
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
    check_shape("input_ids", input_ids, (None, None))
    b, t = input_ids.shape
    hooks = jhooks.split(params)[1]
    n_virtual, n_prefix = jhooks.num_virtual_tokens(hooks), jhooks.num_prefix_tokens(hooks)
    if n_virtual + n_prefix + t + max_new_tokens > model.spec.max_positions:
        extra = "".join(f" + {n} {name}" for n, name in ((n_virtual, "virtual tokens"), (n_prefix, "prefix positions")) if n)
        raise ValueError(f"prompt {t} + {max_new_tokens} new tokens{extra} exceed max_position_embeddings "
                         f"{model.spec.max_positions}")
    mask = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    check_shape("attention_mask", mask, (b, t))
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
