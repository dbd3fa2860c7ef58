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
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from transformers import PhiConfig

from jpeft.models import layers
# the shared pieces, under the names this module has always offered
from jpeft.models.layers import (  # noqa: F401
    REMAT_POLICIES, Linear, check_remat, generate, hf_name, init_cache, param_shapes,
)

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
    cfg = layers.read_config(cfg)
    if cfg.get("model_type", "phi") != "phi":
        raise ValueError(f"expected a Phi configuration (model_type 'phi'), got model_type {cfg['model_type']!r}")
    return PhiConfig(**cfg)


def spec(cfg: PhiConfig) -> layers.Spec:
    """The port's :class:`~jpeft.models.layers.Spec` of a ``PhiConfig``; NotImplementedError for
    variants this port does not cover."""
    rope = layers.rope_settings(cfg)
    unsupported = {
        "qk_layernorm=True": getattr(cfg, "qk_layernorm", False),
        f"hidden_act={cfg.hidden_act!r} (supported: {_GELU_TANH})": cfg.hidden_act not in _GELU_TANH,
        "tie_word_embeddings=True": getattr(cfg, "tie_word_embeddings", False),
        "grouped-query attention (num_key_value_heads != num_attention_heads)":
            (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) != cfg.num_attention_heads,
        f"rope type {rope['rope_type']!r}": rope["rope_type"] != "default",
    }
    bad = [what for what, hit in unsupported.items() if hit]
    if bad:
        raise NotImplementedError(f"jpeft.models.phi does not support {', '.join(bad)}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by {cfg.num_attention_heads} heads")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return layers.Spec(
        vocab_size=cfg.vocab_size, hidden=cfg.hidden_size, layers=cfg.num_hidden_layers,
        heads=cfg.num_attention_heads, kv_heads=cfg.num_attention_heads, head_dim=head_dim,
        intermediate=cfg.intermediate_size,
        inv_freq=layers.rope_frequencies(int(head_dim * rope.get("partial_rotary_factor", 0.5)), rope),
        eps=cfg.layer_norm_eps, max_positions=cfg.max_position_embeddings, init_std=cfg.initializer_range,
        norm="layer", out_proj="dense", qkv_bias=True, out_bias=True, mlp_bias=True, lm_head_bias=True,
        attention_dropout=cfg.attention_dropout or 0.0, resid_pdrop=cfg.resid_pdrop, embd_pdrop=cfg.embd_pdrop,
        special_token_ids=layers.special_token_ids(cfg),
    )


# ------------------------------------------------------------------------- modules


class MLP(nn.Module):
    spec: layers.Spec
    dtype: DType
    param_dtype: DType

    @nn.compact
    def __call__(self, x, deterministic):
        s = self.spec
        h = Linear(s.intermediate, self.dtype, self.param_dtype, s.init_std, name="fc1")(x, deterministic)
        h = jax.nn.gelu(h, approximate=True)  # gelu_new
        return Linear(s.hidden, self.dtype, self.param_dtype, s.init_std, name="fc2")(h, deterministic)


class DecoderLayer(layers.Block):
    """Phi's parallel block: ``x + attn(ln(x)) + mlp(ln(x))``, one LayerNorm."""

    @nn.compact
    def __call__(self, x, positions, allowed, deterministic, layer_cache=None, cache_index=None, prefix=None,
                 hooks=None, context=None):
        hook, x, h, attn, new_cache = self.attend(x, positions, allowed, deterministic, layer_cache, cache_index,
                                                  prefix, hooks, context)
        mlp = MLP(self.spec, self.dtype, self.param_dtype, name="mlp")(h, deterministic)
        attn, mlp = hook("attn", attn, h), hook("mlp", mlp, h)
        drop = nn.Dropout(self.spec.resid_pdrop, deterministic=deterministic)
        out = x + (drop(attn) + drop(mlp)).astype(x.dtype)
        return hook("output", out, x), new_cache


class PhiForCausalLM(layers.CausalLM):
    """Phi causal LM (:class:`jpeft.models.layers.CausalLM` with Phi's parallel layers)."""

    Layer = DecoderLayer
    final_norm = "final_layernorm"


def make_model(cfg: PhiConfig | dict | str, dtype: DType = jnp.float32, param_dtype: DType | None = None,
               remat: str = "none") -> PhiForCausalLM:
    """The Flax module for a ``PhiConfig``, a config dict or a config.json path.

    ``dtype`` is the compute dtype, ``param_dtype`` (default: ``dtype``) that of the weights;
    ``remat`` (a key of :data:`REMAT_POLICIES`) what each layer keeps for the backward pass.
    """
    return layers.build(PhiForCausalLM, spec(load_config(cfg)), dtype, param_dtype, remat)


def init(cfg: PhiConfig | dict | str, key: Array, dtype: DType = jnp.float32,
         param_dtype: DType | None = None) -> tuple[PhiForCausalLM, PyTree]:
    """``(model, params)`` with random weights (normal(initializer_range), zero biases, unit norms).

    Under ``jax.eval_shape`` it allocates nothing (count a full-size model's parameters).
    """
    model = make_model(cfg, dtype, param_dtype)
    return model, layers.init_params(model, key)


# --------------------------------------------------------------- Hugging Face I/O


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
    directory = layers.checkpoint_directory(path_or_hub_id)
    model = make_model(directory, dtype, param_dtype)
    names, read = layers.safetensors_tensors(directory)
    params = layers.load_tensors(model, names, read(), f"checkpoint {directory}", quantize=quantize,
                                 block_size=block_size, double_quant=double_quant)
    return model, params


def save_pretrained(params: PyTree, cfg: PhiConfig | dict | str, path: str | os.PathLike) -> None:
    """Write ``config.json`` and ``model.safetensors`` that transformers' ``PhiForCausalLM`` loads.

    ``params`` must be plain arrays: adapted trees are refused (``jpeft.materialize`` first).
    With several processes every one calls this (arrays split over their devices are
    gathered) and process 0 writes.
    """
    cfg = copy.deepcopy(load_config(cfg))
    tensors = layers.hf_tensors(params, make_model(cfg))
    cfg.architectures = ["PhiForCausalLM"]
    layers.write_checkpoint(tensors, cfg, path)
