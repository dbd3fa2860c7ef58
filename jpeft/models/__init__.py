"""Model ports whose linear layers accept jpeft nodes (see :func:`jpeft.linear`).

- :mod:`jpeft.models.phi`: Phi-1.5 (``model_type`` phi).
- :mod:`jpeft.models.llama`: Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2 (``model_type``
  llama, mistral, qwen2), from Hugging Face checkpoints or GGUF files.
- :mod:`jpeft.models.layers`: what the ports share.

:func:`family` tells which port serves a model name or path; :data:`NAMED_CONFIGS` lists the
configurations known offline (random weights, real shapes), ``download.MODELS`` the real
pretrained models jpeft fetches itself (:func:`fetch`).
"""

from __future__ import annotations

import os
from types import ModuleType

from jpeft.models import download, gguf, layers, llama, phi
from jpeft.models.download import fetch

#: named configuration -> its port
NAMED_CONFIGS: dict[str, ModuleType] = {**{n: phi for n in phi.NAMED_CONFIGS}, **{n: llama for n in llama.NAMED_CONFIGS}}
#: transformers ``model_type`` -> its port
MODEL_TYPES: dict[str, ModuleType] = {"phi": phi, **{t: llama for t in llama.FAMILIES}}


def family(name_or_path: str | os.PathLike) -> ModuleType:
    """The port (:mod:`~jpeft.models.phi` or :mod:`~jpeft.models.llama`) of a named configuration,
    a real model's name, a ``.gguf`` file or a checkpoint directory (by its ``model_type``);
    a directory of another ``model_type`` is a ValueError naming it and the supported ones."""
    text = os.fspath(name_or_path)
    if text in NAMED_CONFIGS:
        return NAMED_CONFIGS[text]
    if llama.reads_gguf(text):
        return llama
    model_type = layers.read_config(text).get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{text}: model_type {model_type!r} is not supported; jpeft ports model_type "
                         f"{', '.join(MODEL_TYPES)}")
    return MODEL_TYPES[model_type]


def config(name: str):
    """The transformers config of a named configuration (:data:`NAMED_CONFIGS`)."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown model configuration {name!r}; known: {sorted(NAMED_CONFIGS)}")
    return NAMED_CONFIGS[name].config(name)


def make_model(cfg, *args, **kwargs):
    """The Flax module of a transformers config of any port (``make_model`` of its family)."""
    return MODEL_TYPES[cfg.model_type].make_model(cfg, *args, **kwargs)


__all__ = ["family", "config", "make_model", "fetch", "download", "gguf", "layers", "llama", "phi",
           "NAMED_CONFIGS", "MODEL_TYPES"]
