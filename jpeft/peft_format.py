"""Hugging Face PEFT's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

What ``peft.PeftModel.from_pretrained`` (and multi-LoRA servers) read. Tensor keys are
``base_model.model.<module>.<name>`` with PyTorch's (out, in) orientation, so the (in, out)
Flax factors are transposed on the way out and back. ``names`` maps a jpeft kernel path to
the Hugging Face module name; the default (:func:`module_name`) is the Phi port's rule
``model/layers_0/self_attn/q_proj/kernel`` -> ``model.layers.0.self_attn.q_proj``.

Supported so far, both directions (:data:`METHODS`): LoRA (``use_rslora`` included), DoRA,
HRA, LoHa, (IA)³, LoKr, OFT (input side, PEFT ≥ 0.15) and BOFT (PEFT builds more than one butterfly
factor only with its CUDA extension). PiSSA/OLoRA adapters, whose frozen weight is a residual rather than
the base, the other methods PEFT has (VeRA, AdaLoRA) and the methods PEFT does
not have are refused with a clear error, as are PEFT options jpeft lacks (``bias``,
``rank_pattern``, ``alpha_pattern``, ``fan_in_fan_out``, ``modules_to_save``, ...).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from jpeft import core
from jpeft.node import Node

PyTree = Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


class Tensor(NamedTuple):
    """One trainable array: jpeft's name, PEFT's key suffix, and how PEFT shapes it."""

    name: str
    suffix: str
    layout: str  # "T": PEFT stores the transpose; "": as is; "col"/"row": a vector as (n, 1) / (1, n); "neg": -x


def _to_peft(x: np.ndarray, layout: str) -> np.ndarray:
    return {"T": lambda: x.T, "": lambda: x, "col": lambda: x[:, None], "row": lambda: x[None, :], "neg": lambda: -x}[layout]()


def _from_peft(x: np.ndarray, layout: str) -> np.ndarray:
    return {"T": lambda: x.T, "": lambda: x, "col": lambda: x[:, 0], "row": lambda: x[0], "neg": lambda: -x}[layout]()


def _lora_tensors(method: str, config) -> list[Tensor]:
    out = [Tensor("a", "lora_A.weight", "T"), Tensor("b", "lora_B.weight", "T")]
    return out + [Tensor("magnitude", "lora_magnitude_vector", "")] if method == "dora" else out


def _lora_config(method: str, c) -> dict:
    return {"peft_type": "LORA", "r": c.r, "lora_alpha": c.alpha, "lora_dropout": c.dropout, "use_rslora": c.rslora,
            "use_dora": method == "dora", "init_lora_weights": "gaussian" if c.init == "gaussian" else True,
            "lora_bias": False, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}}


#: jpeft method -> (PEFT's peft_type, its tensors, its config fields); each is both directions
METHODS = {
    "lora": ("LORA", _lora_tensors, _lora_config),
    "dora": ("LORA", _lora_tensors, _lora_config),
    "hra": ("HRA", lambda m, c: [Tensor("u", "hra_u", "")],
            lambda m, c: {"peft_type": "HRA", "r": c.r, "apply_GS": False, "init_weights": True}),
    "loha": ("LOHA", lambda m, c: [Tensor(k, f"hada_{k}", "T") for k in ("w1_a", "w1_b", "w2_a", "w2_b")],
             lambda m, c: {"peft_type": "LOHA", "r": c.r, "alpha": c.alpha, "rank_dropout": 0.0, "module_dropout": 0.0,
                           "use_effective_conv2d": False, "init_weights": True, "rank_pattern": {}, "alpha_pattern": {}}),
    "ia3": ("IA3", lambda m, c: [Tensor("l", "ia3_l", "row" if c.feedforward else "col")],
            lambda m, c: {"peft_type": "IA3", "fan_in_fan_out": False, "init_ia3_weights": True}),
    # w2 is one matrix or two factors (by the kernel's shape): the tensors a node does not hold are skipped
    "lokr": ("LOKR", lambda m, c: [Tensor("w1", "lokr_w1", "T"), Tensor("w2", "lokr_w2", "T"),
                                   Tensor("w2_out", "lokr_w2_a", "T"), Tensor("w2_in", "lokr_w2_b", "T")],
             lambda m, c: {"peft_type": "LOKR", "r": c.r, "alpha": c.alpha, "rank_dropout": 0.0, "module_dropout": 0.0,
                           "use_effective_conv2d": False, "decompose_both": False, "decompose_factor": c.factor,
                           "rank_dropout_scale": False, "init_weights": True, "rank_pattern": {}, "alpha_pattern": {}}),
    # PEFT's exact Cayley is (I - Q)(I + Q)^-1 but its Neumann series expands (I + Q)(I - Q)^-1, the transpose:
    # jpeft's q is oft_R with the exact transform and -oft_R with the series
    "oft": ("OFT", lambda m, c: [Tensor("q", "oft_R.weight", "" if c.neumann_terms is None else "neg")],
            lambda m, c: _oft_config(c)),
    # boft_R: (n_butterfly, in / b, b, b) as is; PEFT without its CUDA extension builds one factor only
    "boft": ("BOFT", lambda m, c: [Tensor("blocks", "boft_R", ""), Tensor("scale", "boft_s", "col")],
             lambda m, c: {"peft_type": "BOFT", "boft_block_size": c.block_size, "boft_block_num": 0,
                           "boft_n_butterfly_factor": c.n_butterfly, "boft_dropout": 0.0, "init_weights": True,
                           "fan_in_fan_out": False}),
}


def _oft_config(c) -> dict:
    # PEFT's num_cayley_neumann_terms=N sums I + 2Q + ... + 2Q^(N-2) + Q^(N-1): jpeft's t = N - 1 terms (t >= 3)
    return {"peft_type": "OFT", "r": 0, "oft_block_size": c.block_size, "module_dropout": 0.0, "coft": False,
            "eps": 6e-05, "block_share": False, "use_cayley_neumann": c.neumann_terms is not None,
            "num_cayley_neumann_terms": 5 if c.neumann_terms is None else c.neumann_terms + 1, "init_weights": True,
            "fan_in_fan_out": False}


def _check_oft(path: str, config) -> None:
    if config.side != "in" or config.scale:
        raise ValueError(f"{path!r}: PEFT's OFT rotates the inputs without a scaling (side='in', scale=False); "
                         f"this node has side={config.side!r}, scale={config.scale}")
    if config.neumann_terms in (1, 2):
        raise ValueError(f"{path!r}: neumann_terms={config.neumann_terms} has no PEFT counterpart (PEFT's "
                         "num_cayley_neumann_terms=N is jpeft's N - 1 terms, N >= 4; use None or >= 3)")


def _hparams(config_path: str, config: dict, modules: list[str]) -> tuple[str, dict]:
    """The jpeft method and hyper-parameters of a PEFT config."""
    kind = config.get("peft_type")
    if kind == "LORA":
        return ("dora" if config.get("use_dora") else "lora"), dict(
            r=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout") or 0.0),
            rslora=bool(config.get("use_rslora", False)))
    if kind == "HRA":
        if config.get("apply_GS"):
            raise ValueError(f"{config_path}: apply_GS=True (Gram-Schmidt HRA) has no jpeft counterpart")
        return "hra", dict(r=int(config["r"]))
    if kind == "LOHA":
        for field in ("rank_dropout", "module_dropout"):
            if config.get(field):
                raise ValueError(f"{config_path}: {field}={config[field]!r} has no jpeft counterpart (supported: 0)")
        return "loha", dict(r=int(config["r"]), alpha=float(config["alpha"]))
    if kind == "LOKR":
        for field in ("rank_dropout", "module_dropout"):
            if config.get(field):
                raise ValueError(f"{config_path}: {field}={config[field]!r} has no jpeft counterpart (supported: 0)")
        if config.get("decompose_both"):
            raise ValueError(f"{config_path}: decompose_both=True (a low-rank first factor) has no jpeft counterpart "
                             "(supported: False)")
        return "lokr", dict(r=int(config["r"]), alpha=float(config["alpha"]),
                            factor=int(config.get("decompose_factor", -1)))
    if kind == "OFT":
        for field, off in (("coft", False), ("block_share", False), ("module_dropout", 0.0)):
            if config.get(field):
                raise ValueError(f"{config_path}: {field}={config[field]!r} has no jpeft counterpart (supported: {off!r})")
        if not config.get("oft_block_size"):
            raise ValueError(f"{config_path}: r={config.get('r')!r} (a number of blocks per layer, oft_block_size=0) has "
                             "no jpeft counterpart; jpeft's OFT takes oft_block_size")
        terms = None
        if config.get("use_cayley_neumann", True):  # PEFT's default
            n = int(config.get("num_cayley_neumann_terms", 5))
            if n < 3:
                raise ValueError(f"{config_path}: num_cayley_neumann_terms={n} has no jpeft counterpart (supported: >= 3)")
            terms = max(n - 1, 3)  # PEFT's N=3 and N=4 both sum I + 2Q + 2Q² + Q³
        return "oft", dict(block_size=int(config["oft_block_size"]), side="in", neumann_terms=terms)
    if kind == "BOFT":
        if config.get("boft_dropout"):
            raise ValueError(f"{config_path}: boft_dropout={config['boft_dropout']!r} (multiplicative dropout of whole "
                             "blocks) has no jpeft counterpart (supported: 0)")
        if not config.get("boft_block_size"):
            raise ValueError(f"{config_path}: boft_block_num={config.get('boft_block_num')!r} (a number of blocks per "
                             "layer, boft_block_size=0) has no jpeft counterpart; jpeft's BOFT takes boft_block_size")
        return "boft", dict(block_size=int(config["boft_block_size"]),
                            n_butterfly=int(config.get("boft_n_butterfly_factor", 1)))
    if kind == "IA3":
        feedforward = config.get("feedforward_modules") or []
        ff = [m for m in modules if m in feedforward or any(m.endswith("." + f) for f in feedforward)]
        if ff and len(ff) != len(modules):
            raise ValueError(f"{config_path}: feedforward_modules covers {len(ff)} of the {len(modules)} adapted modules; "
                             "jpeft's ia3 scales all inputs or all outputs of one tree (apply it twice for both)")
        return "ia3", dict(feedforward=bool(ff))
    known = sorted({kind for kind, _, _ in METHODS.values()})
    raise ValueError(f"{config_path}: peft_type {kind!r} is not supported; supported: {known}")


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
    _exportable_nodes(adapted)


def _exportable_nodes(adapted: PyTree) -> dict[str, Node]:
    nodes = {p: x for p, x in core.leaves_with_paths(adapted) if core.is_node(x)}
    if not nodes:
        raise ValueError("the tree holds no jpeft node to export")
    methods = sorted({n.method for n in nodes.values()})
    if len(methods) != 1 or methods[0] not in METHODS:
        raise ValueError(f"PEFT's format is written here for one method of {sorted(METHODS)}; the tree has {methods} "
                         "(methods PEFT does not have keep jpeft's adapter format: jpeft.checkpoint.save_adapter)")
    for p, n in nodes.items():
        if n.layout != "io":
            raise ValueError(f"{p!r}: only 2-D (in, out) kernels map to PEFT's Linear layers; its layout is {n.layout!r}")
        if getattr(n.config, "init", "gaussian") not in ("gaussian", "kaiming"):
            raise ValueError(f"{p!r}: a {n.config.init} adapter's frozen weight is a residual, not the base; "
                             "PEFT's conversion of it to a plain LoRA is not supported yet")
    _check_ia3_biases(adapted, nodes)
    for p, n in nodes.items():
        if n.method == "oft":
            _check_oft(p, n.config)
    configs = {n.config for n in nodes.values()}
    if len(configs) != 1:
        raise ValueError(f"every node must share one configuration (PEFT's rank_pattern is not supported); got {configs}")
    return nodes


def _check_ia3_biases(tree: PyTree, nodes: dict) -> None:
    """PEFT's output-side (IA)³ scales the layer's bias too, jpeft's only ``x K``: the two
    agree only on layers without a bias, so others are refused rather than changed."""
    leaves = dict(core.leaves_with_paths(tree))
    biased = [p for p, n in nodes.items() if n.method == "ia3" and not n.config.feedforward
              and p.rsplit("/", 1)[0] + "/bias" in leaves]
    if biased:
        raise ValueError(f"(IA)³ on the outputs of layers with a bias ({biased[:3]}): PEFT scales the bias too and jpeft "
                         "does not, so the adapter would not carry over; use feedforward=True (input scaling) there")


def save(adapted: PyTree, directory: str | os.PathLike, *, names=None, base_model_name_or_path: str | None = None) -> None:
    """Write ``adapted``'s nodes (one method of :data:`METHODS`) as PEFT 0.21 writes the same adapter."""
    nodes = _exportable_nodes(adapted)
    name = _namer(names)
    first = next(iter(nodes.values()))
    kind, tensor_spec, config_fields = METHODS[first.method]
    tensors = {}
    for path, node in nodes.items():
        for t in tensor_spec(first.method, first.config):
            if t.name not in node.trainable:
                continue
            x = np.asarray(node.trainable[t.name], np.float32)
            tensors[f"{PREFIX}{name(path)}.{t.suffix}"] = np.ascontiguousarray(_to_peft(x, t.layout))
    modules = sorted(name(p) for p in nodes)
    config = {"task_type": None, "base_model_name_or_path": base_model_name_or_path, "target_modules": modules,
              "bias": "none", "modules_to_save": None, "inference_mode": True,
              **config_fields(first.method, first.config)}
    if first.method == "ia3":
        config["feedforward_modules"] = modules if first.config.feedforward else []
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS))
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


#: PEFT options jpeft does not have, with the value that means "off"
_UNSUPPORTED = {"bias": "none", "lora_bias": False, "fan_in_fan_out": False, "modules_to_save": None, "rank_pattern": {},
                "alpha_pattern": {}, "layers_to_transform": None, "layer_replication": None, "target_parameters": None}


def load(params: PyTree, directory: str | os.PathLike, *, names=None) -> PyTree:
    """``params`` adapted by the PEFT adapter in ``directory`` (written by PEFT or by
    :func:`save`; a method of :data:`METHODS`): nodes with the file's hyper-parameters and
    arrays. Anything jpeft cannot represent is a ValueError naming the file and the key."""
    config_path, weights_path = (os.path.join(directory, f) for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    with open(config_path) as f:
        config = json.load(f)
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
    # "<module>.lora_A.weight", "<module>.hra_u": the module is what precedes the array's own name
    modules = sorted({k.removesuffix(".weight").rsplit(".", 1)[0] for k in tensors})
    unknown = [m for m in modules if m not in by_module]
    if unknown:
        raise ValueError(f"{weights_path}: modules {unknown[:5]} match no kernel of the parameters "
                         f"(e.g. {sorted(by_module)[:3]}); pass names= for this model")
    method, hparams = _hparams(config_path, config, [m[len(PREFIX):] for m in modules])
    targets = [re.escape(by_module[m]) for m in modules]
    adapted = core.apply(params, method, key=jax.random.key(0), targets=targets, **hparams)
    _check_ia3_biases(adapted, {p: x for p, x in core.leaves_with_paths(adapted) if core.is_node(x)})

    def take(path, leaf):
        p = core.path_str(path)
        if not core.is_node(leaf):
            return leaf
        module = PREFIX + name(p)
        wanted = {t.name: (f"{module}.{t.suffix}", t.layout) for t in METHODS[method][1](method, leaf.config)
                  if t.name in leaf.trainable}
        trainable = {}
        for k, (key, layout) in wanted.items():
            if key not in tensors:
                raise ValueError(f"{weights_path}: missing tensor {key!r}")
            shape = _to_peft(np.zeros(leaf.trainable[k].shape), layout).shape
            if tensors[key].shape != shape:
                raise ValueError(f"{weights_path}: {key!r} has shape {tensors[key].shape}, the model's {p!r} needs {shape}")
            trainable[k] = jax.numpy.asarray(_from_peft(tensors[key], layout), jax.numpy.float32)
        return leaf.replace(trainable=trainable)

    return jax.tree_util.tree_map_with_path(take, adapted, is_leaf=core.is_node)
