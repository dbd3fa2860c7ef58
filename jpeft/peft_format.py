"""Hugging Face PEFT's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

What ``peft.PeftModel.from_pretrained`` (and multi-LoRA servers) read. Tensor keys are
``base_model.model.<module>.<name>`` with PyTorch's (out, in) orientation, so the (in, out)
Flax factors are transposed on the way out and back. ``names`` maps a jpeft kernel path to
the Hugging Face module name; the default (:func:`module_name`) is the Phi port's rule
``model/layers_0/self_attn/q_proj/kernel`` -> ``model.layers.0.self_attn.q_proj``.

Supported so far, both directions: LoRA (``use_rslora`` included) and DoRA. PiSSA/OLoRA
adapters, whose frozen weight is a residual rather than the base, and the other methods
PEFT has are refused with a clear error, as are PEFT options jpeft lacks (``bias``,
``rank_pattern``, ``alpha_pattern``, ``fan_in_fan_out``, ``modules_to_save``).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from jpeft import core
from jpeft.node import Node

PyTree = Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
#: jpeft methods this module writes and reads, by PEFT ``peft_type``
PEFT_TYPES = {"lora": "LORA", "dora": "LORA"}


def module_name(path: str) -> str:
    """The Phi port's (and most linen models') rule: drop the leaf name, ``/`` -> ``.``,
    ``layers_3`` -> ``layers.3``."""
    parts = path.split("/")[:-1]
    return ".".join(re.sub(r"_(\d+)$", r".\1", p) for p in parts)


def _namer(names: Callable[[str], str] | Mapping[str, str] | None) -> Callable[[str], str]:
    if names is None:
        return module_name
    if callable(names):
        return names
    return lambda path: names[path]


def check(adapted: PyTree) -> None:
    """Raise (ValueError) now if :func:`save` could not write ``adapted`` (e.g. before training)."""
    _lora_nodes(adapted)


def _lora_nodes(adapted: PyTree) -> dict[str, Node]:
    nodes = {p: x for p, x in core.leaves_with_paths(adapted) if core.is_node(x)}
    if not nodes:
        raise ValueError("the tree holds no jpeft node to export")
    methods = sorted({n.method for n in nodes.values()})
    if len(methods) != 1 or methods[0] not in PEFT_TYPES:
        raise ValueError(f"PEFT's format is written here for one method of {sorted(PEFT_TYPES)}; the tree has {methods}")
    for p, n in nodes.items():
        if n.layout != "io":
            raise ValueError(f"{p!r}: only 2-D (in, out) kernels map to PEFT's Linear layers; its layout is {n.layout!r}")
        if n.config.init not in ("gaussian", "kaiming"):
            raise ValueError(f"{p!r}: a {n.config.init} adapter's frozen weight is a residual, not the base; "
                             "PEFT's conversion of it to a plain LoRA is not supported yet")
    configs = {n.config for n in nodes.values()}
    if len(configs) != 1:
        raise ValueError(f"every node must share one configuration (PEFT's rank_pattern is not supported); got {configs}")
    return nodes


def save(adapted: PyTree, directory: str | os.PathLike, *, names=None, base_model_name_or_path: str | None = None) -> None:
    """Write ``adapted``'s LoRA or DoRA nodes as PEFT 0.21 writes the same adapter."""
    nodes = _lora_nodes(adapted)
    name = _namer(names)
    first = next(iter(nodes.values()))
    c = first.config
    tensors = {}
    for path, node in nodes.items():
        module = PREFIX + name(path)
        t = node.trainable
        tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(np.asarray(t["a"], np.float32).T)
        tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(np.asarray(t["b"], np.float32).T)
        if first.method == "dora":
            tensors[f"{module}.lora_magnitude_vector"] = np.asarray(t["magnitude"], np.float32)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": c.r, "lora_alpha": c.alpha, "lora_dropout": c.dropout, "use_rslora": c.rslora,
        "use_dora": first.method == "dora", "init_lora_weights": "gaussian" if c.init == "gaussian" else True,
        "target_modules": sorted(name(p) for p in nodes), "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS))
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


#: PEFT options jpeft does not have, with the value that means "off"
_UNSUPPORTED = {"bias": "none", "lora_bias": False, "fan_in_fan_out": False, "modules_to_save": None, "rank_pattern": {},
                "alpha_pattern": {}, "layers_to_transform": None, "layer_replication": None, "target_parameters": None}


def load(params: PyTree, directory: str | os.PathLike, *, names=None) -> PyTree:
    """``params`` adapted by the PEFT LoRA/DoRA adapter in ``directory`` (written by PEFT or
    by :func:`save`): nodes with the file's hyper-parameters and arrays."""
    config_path, weights_path = (os.path.join(directory, f) for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not supported; supported: ['LORA']")
    for field, off in _UNSUPPORTED.items():
        if config.get(field) not in (None, off):
            raise ValueError(f"{config_path}: {field}={config[field]!r} has no jpeft counterpart (supported: {off!r})")
    try:
        tensors = load_file(weights_path)
    except Exception as e:  # safetensors raises its own error types on a damaged file
        raise ValueError(f"{weights_path}: not a readable safetensors file ({e})") from None
    name = _namer(names)
    kernels = {p: x for p, x in core.leaves_with_paths(params) if p.endswith("kernel")}
    by_module = {PREFIX + name(p): p for p in kernels}
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    unknown = [m for m in modules if m not in by_module]
    if unknown:
        raise ValueError(f"{weights_path}: modules {unknown[:5]} match no kernel of the parameters "
                         f"(e.g. {sorted(by_module)[:3]}); pass names= for this model")
    method = "dora" if config.get("use_dora") else "lora"
    hparams = dict(r=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout", 0.0)),
                   rslora=bool(config.get("use_rslora", False)))
    targets = [re.escape(by_module[m]) for m in modules]
    adapted = core.apply(params, method, key=jax.random.key(0), targets=targets, **hparams)

    def take(path, leaf):
        p = core.path_str(path)
        if not core.is_node(leaf):
            return leaf
        module = PREFIX + name(p)
        wanted = {"a": (f"{module}.lora_A.weight", (leaf.config.r, leaf.shape[0])),
                  "b": (f"{module}.lora_B.weight", (leaf.shape[1], leaf.config.r))}
        if method == "dora":
            wanted["magnitude"] = (f"{module}.lora_magnitude_vector", (leaf.shape[1],))
        trainable = {}
        for k, (key, shape) in wanted.items():
            if key not in tensors:
                raise ValueError(f"{weights_path}: missing tensor {key!r}")
            x = tensors[key]
            if x.shape != shape:
                raise ValueError(f"{weights_path}: {key!r} has shape {x.shape}, the model's {p!r} needs {shape}")
            trainable[k] = jax.numpy.asarray(x.T if x.ndim == 2 else x, jax.numpy.float32)
        return leaf.replace(trainable=trainable)

    return jax.tree_util.tree_map_with_path(take, adapted, is_leaf=core.is_node)
