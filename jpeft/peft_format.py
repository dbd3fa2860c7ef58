"""Hugging Face PEFT's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

What ``peft.PeftModel.from_pretrained``, vLLM/TGI multi-LoRA servers and the Hub read.
Tensor keys are ``base_model.model.<module>.<name>`` with PyTorch's (out, in) orientation,
so the (in, out) Flax factors are transposed on the way out and back. ``names`` maps a
jpeft kernel path to the Hugging Face module name: a function, a dict (paths it lacks are
not addressable), or the default :func:`module_name`, the ports' rule (Phi and Llama)
``model/layers_0/self_attn/q_proj/kernel`` -> ``model.layers.0.self_attn.q_proj``.

Both directions (:data:`METHODS`): LoRA (``use_rslora``; PiSSA/OLoRA, see :func:`save`),
DoRA, LoKr, OFT (input side, PEFT >= 0.15), BOFT (PEFT builds more than one butterfly
factor only with its CUDA extension), HRA, LoHa, (IA)³, VeRA (its shared projections
``base_model.vera_A``/``vera_B`` are written, PEFT's ``save_projection=True``) and AdaLoRA
(a file pruned by PEFT, with ``rank_pattern``, loads with the pruned ranks zeroed; jpeft
writes every rank, so a round trip is exact). Methods PEFT does not have keep jpeft's own
adapter format (:func:`jpeft.checkpoint.save_adapter`). PEFT options jpeft lacks
(``bias``, ``alpha_pattern``, ``fan_in_fan_out``, ``modules_to_save``, ...), an unknown
``peft_type``, a ``target_modules`` entry matching no module, a missing, unexpected or
misshaped tensor: each is a ValueError naming the file and the field or key.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jpeft import checkpoint, core
from jpeft.methods import lora
from jpeft.methods.registry import make_config
from jpeft.node import Node, is_node
from jpeft.quantized import plain_kernel
from jpeft.tree import leaves_with_paths, path_str

PyTree = Any
Names = Callable[[str], str] | Mapping[str, str] | None

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
#: VeRA's projections, shared by every layer: (r, max in) and (max out, r)
VERA_A, VERA_B = "base_model.vera_A", "base_model.vera_B"


class Tensor(NamedTuple):
    """One trainable array: jpeft's name, PEFT's key suffix, and how PEFT shapes it."""

    name: str
    suffix: str
    layout: str  # "T": PEFT stores the transpose; "": as is; "col"/"row": a vector as (n, 1) / (1, n); "neg": -x


class Format(NamedTuple):
    """How one jpeft method is written by PEFT: its ``peft_type``, its tensors and its config
    fields, each a function of the node configuration."""

    peft_type: str
    tensors: Callable[[Any], list[Tensor]]
    config: Callable[[Any], dict]


def _to_peft(x: np.ndarray, layout: str) -> np.ndarray:
    return {"T": lambda: x.T, "": lambda: x, "col": lambda: x[:, None], "row": lambda: x[None, :], "neg": lambda: -x}[layout]()


def _from_peft(x: np.ndarray, layout: str) -> np.ndarray:
    return {"T": lambda: x.T, "": lambda: x, "col": lambda: x[:, 0], "row": lambda: x[0], "neg": lambda: -x}[layout]()


LORA_TENSORS = [Tensor("a", "lora_A.weight", "T"), Tensor("b", "lora_B.weight", "T")]
#: PEFT's off values of the options every LoRA-family config records
_LORA_OFF = {"lora_bias": False, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}}


def _lora_config(c, dora: bool) -> dict:
    init = {"gaussian": "gaussian", "kaiming": True}.get(c.init, c.init)  # PEFT's True is kaiming-uniform A
    return {"peft_type": "LORA", "r": c.r, "lora_alpha": c.alpha, "lora_dropout": c.dropout, "use_rslora": c.rslora,
            "use_dora": dora, "init_lora_weights": init, **_LORA_OFF}


def _oft_config(c) -> dict:
    # PEFT's num_cayley_neumann_terms=N sums I + 2Q + ... + 2Q^(N-2) + Q^(N-1): jpeft's t = N - 1 terms (t >= 3)
    return {"peft_type": "OFT", "r": 0, "oft_block_size": c.block_size, "module_dropout": 0.0, "coft": False,
            "eps": 6e-05, "block_share": False, "use_cayley_neumann": c.neumann_terms is not None,
            "num_cayley_neumann_terms": 5 if c.neumann_terms is None else c.neumann_terms + 1, "init_weights": True,
            "fan_in_fan_out": False}


def _adalora_config(c) -> dict:
    # every rank is written (rank_pattern None), so the file is PEFT's before its first allocation
    return {"peft_type": "ADALORA", "init_r": c.r, "target_r": c.target_r, "lora_alpha": c.alpha,
            "lora_dropout": c.dropout, "tinit": c.tinit, "tfinal": c.tfinal, "deltaT": c.deltaT, "beta1": c.beta1,
            "beta2": c.beta2, "orth_reg_weight": c.orth_reg_weight, "total_step": c.total_step, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, **_LORA_OFF, "rank_pattern": None}


_DROPOUTS_OFF = {"rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False, "init_weights": True,
                 "rank_pattern": {}, "alpha_pattern": {}}

#: jpeft method -> how PEFT writes it; each is both directions
METHODS = {
    "lora": Format("LORA", lambda c: LORA_TENSORS, lambda c: _lora_config(c, dora=False)),
    "dora": Format("LORA", lambda c: LORA_TENSORS + [Tensor("magnitude", "lora_magnitude_vector", "")],
                   lambda c: _lora_config(c, dora=True)),
    "hra": Format("HRA", lambda c: [Tensor("u", "hra_u", "")],
                  lambda c: {"peft_type": "HRA", "r": c.r, "apply_GS": False, "init_weights": True}),
    "loha": Format("LOHA", lambda c: [Tensor(k, f"hada_{k}", "T") for k in ("w1_a", "w1_b", "w2_a", "w2_b")],
                   lambda c: {"peft_type": "LOHA", "r": c.r, "alpha": c.alpha, **_DROPOUTS_OFF}),
    "ia3": Format("IA3", lambda c: [Tensor("l", "ia3_l", "row" if c.feedforward else "col")],
                  lambda c: {"peft_type": "IA3", "fan_in_fan_out": False, "init_ia3_weights": True}),
    # w2 is one matrix or two factors (by the kernel's shape): the tensors a node does not hold are skipped
    "lokr": Format("LOKR", lambda c: [Tensor("w1", "lokr_w1", "T"), Tensor("w2", "lokr_w2", "T"),
                                      Tensor("w2_out", "lokr_w2_a", "T"), Tensor("w2_in", "lokr_w2_b", "T")],
                   lambda c: {"peft_type": "LOKR", "r": c.r, "alpha": c.alpha, "decompose_both": False,
                              "decompose_factor": c.factor, "rank_dropout_scale": False, **_DROPOUTS_OFF}),
    # PEFT's exact Cayley is (I - Q)(I + Q)^-1 but its Neumann series expands (I + Q)(I - Q)^-1, the transpose:
    # jpeft's q is oft_R with the exact transform and -oft_R with the series
    "oft": Format("OFT", lambda c: [Tensor("q", "oft_R.weight", "" if c.neumann_terms is None else "neg")], _oft_config),
    # boft_R: (n_butterfly, in / b, b, b) as is; PEFT without its CUDA extension builds one factor only
    "boft": Format("BOFT", lambda c: [Tensor("blocks", "boft_R", ""), Tensor("scale", "boft_s", "col")],
                   lambda c: {"peft_type": "BOFT", "boft_block_size": c.block_size, "boft_block_num": 0,
                              "boft_n_butterfly_factor": c.n_butterfly, "boft_dropout": 0.0, "init_weights": True,
                              "fan_in_fan_out": False}),
    # the projections (frozen a, b) are the shared VERA_A / VERA_B, written once
    "vera": Format("VERA", lambda c: [Tensor("lambda_d", "vera_lambda_d", ""), Tensor("lambda_b", "vera_lambda_b", "")],
                   lambda c: {"peft_type": "VERA", "r": c.r, "d_initial": c.d_init, "vera_dropout": c.dropout,
                              "projection_prng_key": 0, "save_projection": True, "init_weights": True,
                              "fan_in_fan_out": False}),
    "adalora": Format("ADALORA", lambda c: [Tensor("a", "lora_A", "T"), Tensor("e", "lora_E", "col"),
                                            Tensor("b", "lora_B", "T")], _adalora_config),
}


def _refuse_on(config_path: str, config: dict, off: dict) -> None:
    """A ValueError naming the first field of ``off`` that ``config`` sets to another value."""
    for field, value in off.items():
        if config.get(field) not in (None, value):
            raise ValueError(f"{config_path}: {field}={config[field]!r} has no jpeft counterpart (supported: {value!r})")


#: PEFT's ``init_lora_weights`` -> jpeft's LoRA ``init`` (True is kaiming-uniform A; False, a test init, random B too)
_LORA_INITS = {True: "kaiming", False: "kaiming", "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def _hparams(config_path: str, config: dict, modules: list[str]) -> tuple[str, dict]:
    """The jpeft method and hyper-parameters of a PEFT config."""
    kind = config.get("peft_type")
    if kind == "LORA":
        init = config.get("init_lora_weights", True)
        if init not in _LORA_INITS:
            raise ValueError(f"{config_path}: init_lora_weights={init!r} has no jpeft counterpart (supported: True, "
                             "False, 'gaussian', 'pissa', 'olora'; PEFT converts other inits to plain LoRA when saving "
                             "with path_initial_model_for_weight_conversion)")
        return ("dora" if config.get("use_dora") else "lora"), dict(
            r=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout") or 0.0),
            rslora=bool(config.get("use_rslora", False)), init=_LORA_INITS[init])
    if kind == "ADALORA":
        fields = ("target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")
        return "adalora", dict(r=int(config["init_r"]), alpha=float(config["lora_alpha"]),
                               dropout=float(config.get("lora_dropout") or 0.0),
                               **{k: config[k] for k in fields if config.get(k) is not None})
    if kind == "VERA":
        if not config.get("save_projection", True):
            raise ValueError(f"{config_path}: save_projection=False: PEFT rebuilds the projections from "
                             "projection_prng_key with PyTorch's generator, which jpeft does not reproduce; save the "
                             "adapter with save_projection=True")
        return "vera", dict(r=int(config["r"]), d_init=float(config.get("d_initial", 0.1)),
                            dropout=float(config.get("vera_dropout") or 0.0))
    if kind == "HRA":
        _refuse_on(config_path, config, {"apply_GS": False})
        return "hra", dict(r=int(config["r"]))
    if kind in ("LOHA", "LOKR"):
        _refuse_on(config_path, config, {"rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False})
        if kind == "LOHA":
            return "loha", dict(r=int(config["r"]), alpha=float(config["alpha"]))
        if config.get("decompose_both"):
            raise ValueError(f"{config_path}: decompose_both=True (a low-rank first factor) has no jpeft counterpart "
                             "(supported: False)")
        return "lokr", dict(r=int(config["r"]), alpha=float(config["alpha"]),
                            factor=int(config.get("decompose_factor", -1)))
    if kind == "OFT":
        _refuse_on(config_path, config, {"coft": False, "block_share": False, "module_dropout": 0.0})
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
        ff = [m for m in modules if _matches(m, feedforward)]
        if ff and len(ff) != len(modules):
            raise ValueError(f"{config_path}: feedforward_modules covers {len(ff)} of the {len(modules)} adapted modules; "
                             "jpeft's ia3 scales all inputs or all outputs of one tree (apply it twice for both)")
        return "ia3", dict(feedforward=bool(ff))
    known = sorted({f.peft_type for f in METHODS.values()})
    raise ValueError(f"{config_path}: peft_type {kind!r} is not supported; supported: {known}")


def _matches(module: str, targets: str | list[str]) -> bool:
    """PEFT's module matching: a regex over the whole name, or any entry equal to the name or
    to a suffix of it after a dot."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def module_name(path: str) -> str:
    """The ports' (Phi, Llama; and most linen models') rule: drop the leaf name, ``/`` -> ``.``,
    ``layers_3`` -> ``layers.3``."""
    parts = path.split("/")[:-1]
    return ".".join(re.sub(r"_(\d+)$", r".\1", p) for p in parts)


def _namer(names: Names) -> Callable[[str], str | None]:
    if names is None:
        return module_name
    if callable(names):
        return names
    return names.get


def _target_modules(modules: list[str], every_module: list[str]) -> list[str]:
    """What PEFT users write: the last names (``["q_proj", "v_proj"]``) when these select
    exactly the adapted modules of the model, else the full names."""
    last = sorted({m.rsplit(".", 1)[-1] for m in modules})
    return last if {m for m in every_module if _matches(m, last)} == set(modules) else sorted(modules)


def check(adapted: PyTree, *, base: PyTree | None = None) -> None:
    """Raise (ValueError) now if :func:`save` could not write ``adapted`` (e.g. before training;
    AdaLoRA's ``total_step``, which ``jpeft.train`` fills in, is checked by :func:`save`)."""
    _exportable_nodes(adapted, base)


def _exportable_nodes(adapted: PyTree, base: PyTree | None) -> dict[str, Node]:
    nodes = {p: x for p, x in leaves_with_paths(adapted) if is_node(x)}
    if not nodes:
        raise ValueError("the tree holds no jpeft node to export")
    methods = sorted({n.method for n in nodes.values()})
    if len(methods) != 1 or methods[0] not in METHODS:
        raise ValueError(f"PEFT's format is written here for one method of {sorted(METHODS)}; the tree has {methods} "
                         "(the others, PEFT's prompt methods included, keep jpeft's adapter format: jpeft.checkpoint.save_adapter)")
    configs = {n.config for n in nodes.values()}
    if len(configs) != 1:
        raise ValueError(f"every node must share one configuration (PEFT's rank_pattern is not supported); got {configs}")
    config = configs.pop()
    for p, n in nodes.items():
        if n.layout != "io":
            raise ValueError(f"{p!r}: only 2-D (in, out) kernels map to PEFT's Linear layers; its layout is {n.layout!r}")
        if n.method == "oft":
            _check_oft(p, config)
    _check_ia3_biases(adapted, nodes)
    if base is not None and getattr(config, "init", None) in lora.RESIDUAL_INITS:
        _initial_factors(nodes, base)  # raises now if base is not these nodes' base
    return nodes


def _check_oft(path: str, config) -> None:
    if config.side != "in" or config.scale:
        raise ValueError(f"{path!r}: PEFT's OFT rotates the inputs without a scaling (side='in', scale=False); "
                         f"this node has side={config.side!r}, scale={config.scale}")
    if config.neumann_terms in (1, 2):
        raise ValueError(f"{path!r}: neumann_terms={config.neumann_terms} has no PEFT counterpart (PEFT's "
                         "num_cayley_neumann_terms=N is jpeft's N - 1 terms, N >= 4; use None or >= 3)")


def _check_ia3_biases(tree: PyTree, nodes: dict) -> None:
    """PEFT's output-side (IA)³ scales the layer's bias too, jpeft's only ``x K``: the two
    agree only on layers without a bias, so others are refused rather than changed."""
    leaves = dict(leaves_with_paths(tree))
    biased = [p for p, n in nodes.items() if n.method == "ia3" and not n.config.feedforward
              and p.rsplit("/", 1)[0] + "/bias" in leaves]
    if biased:
        raise ValueError(f"(IA)³ on the outputs of layers with a bias ({biased[:3]}): PEFT scales the bias too and jpeft "
                         "does not, so the adapter would not carry over; use feedforward=True (input scaling) there")


def _initial_factors(nodes: dict[str, Node], base: PyTree) -> dict[str, dict]:
    """PiSSA's/OLoRA's initial ``a₀``, ``b₀`` of each node, recomputed from ``base`` (the
    split is deterministic), after checking that ``base`` is the weight they were split from."""
    kernels = dict(leaves_with_paths(base))
    out = {}
    for p, node in nodes.items():
        kernel = kernels.get(p)
        if kernel is None or is_node(kernel) or tuple(kernel.shape) != node.shape:
            raise ValueError(f"base: no {node.shape} kernel at {p!r} to recompute the initial PiSSA/OLoRA factors from")
        initial, frozen = lora.residual_split(jnp.asarray(plain_kernel(kernel)), node.config)
        check = lora.BASE_CHECK[node.config.init]
        if not np.allclose(np.asarray(frozen[check], np.float32), np.asarray(node.frozen[check], np.float32),
                           rtol=1e-6, atol=0):
            raise ValueError(f"base: the kernel at {p!r} is not the one this {node.config.init} adapter was split from "
                             f"(its {check} differs)")
        out[p] = {k: np.asarray(v, np.float32) for k, v in initial.items()}
    return out


def _vera_projections(nodes: dict[str, Node]) -> dict[str, np.ndarray]:
    """PEFT's shared ``vera_A`` (r, max in) and ``vera_B`` (max out, r): each node's frozen
    ``a``/``b`` must be the leading rows/columns of the widest one."""
    out = {}
    for key, name, axis in ((VERA_A, "a", 0), (VERA_B, "b", 1)):
        arrays = {p: np.asarray(n.frozen[name], np.float32) for p, n in nodes.items()}
        widest = max(arrays.values(), key=lambda x: x.shape[axis])
        for p, x in arrays.items():
            if not np.array_equal(x, np.take(widest, np.arange(x.shape[axis]), axis=axis)):
                raise ValueError(f"{p!r}: its VeRA projection {name!r} is not a slice of the widest one, so the nodes "
                                 "do not share PEFT's one vera_A/vera_B (apply VeRA to all of them in one jpeft.apply)")
        out[key] = widest.T
    return out


def save(adapted: PyTree, directory: str | os.PathLike, *, names: Names = None,
         base_model_name_or_path: str | None = None, base: PyTree | None = None) -> None:
    """Write ``adapted``'s nodes (one method of :data:`METHODS`) as PEFT 0.21 writes the same adapter.

    PiSSA/OLoRA adapters train on a residual, not on the base. Without ``base`` they are
    written as PEFT saves them by default (``init_lora_weights="pissa"``; PEFT recomputes the
    residual from the base when loading). With ``base`` (the parameters the adapter was
    applied to) they are written as PEFT's ``path_initial_model_for_weight_conversion``
    writes them: a plain LoRA of rank 2r, ``A' = [A; A₀]``, ``B' = [B, -B₀]``, alpha scaled to
    keep ``s``, which any LoRA server loads on the unchanged base.
    """
    nodes = _exportable_nodes(adapted, base)
    config = next(iter(nodes.values())).config
    method = next(iter(nodes.values())).method
    if method == "adalora" and config.total_step is None:
        raise ValueError("adalora: total_step=None, and PEFT's AdaLoraConfig needs total_step > 0; apply with "
                         "total_step=... (jpeft train sets it to the run's steps)")
    name = _namer(names)
    modules = {}
    for p in nodes:
        modules[p] = name(p)
        if not modules[p]:
            raise ValueError(f"names gives no module name for the node at {p!r}")
    fmt = METHODS[method]
    tensors = {}
    for p, node in nodes.items():
        for t in fmt.tensors(config):
            if t.name in node.trainable:
                tensors[f"{PREFIX}{modules[p]}.{t.suffix}"] = _to_peft(np.asarray(node.trainable[t.name], np.float32),
                                                                        t.layout)
    fields = fmt.config(config)
    if method == "vera":
        tensors.update(_vera_projections(nodes))
    if base is not None and getattr(config, "init", None) in lora.RESIDUAL_INITS:
        for p, initial in _initial_factors(nodes, base).items():
            a, b = f"{PREFIX}{modules[p]}.lora_A.weight", f"{PREFIX}{modules[p]}.lora_B.weight"
            tensors[a] = np.concatenate([tensors[a], initial["a"].T], axis=0)
            tensors[b] = np.concatenate([tensors[b], -initial["b"].T], axis=1)
        fields.update(r=2 * config.r, lora_alpha=config.alpha * (2**0.5 if config.rslora else 2), init_lora_weights=True)
    every_module = [m for p, x in leaves_with_paths(adapted)
                    if (is_node(x) or (p.endswith("kernel") and np.ndim(x) == 2)) and (m := name(p))]
    targets = _target_modules(sorted(modules.values()), every_module)
    record = {"task_type": None, "base_model_name_or_path": base_model_name_or_path, "target_modules": targets,
              "bias": "none", "modules_to_save": None, "inference_mode": True, **fields}
    if method == "ia3":
        record["feedforward_modules"] = targets if config.feedforward else []
    # everything is checked and built before the directory is touched; each file appears whole
    os.makedirs(directory, exist_ok=True)
    weights, config_path = (os.path.join(directory, f) for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, weights + ".tmp")
    with open(config_path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(weights + ".tmp", weights)
    os.replace(config_path + ".tmp", config_path)


#: PEFT options jpeft does not have, with the value that means "off"
_UNSUPPORTED = {"bias": "none", "lora_bias": False, "fan_in_fan_out": False, "modules_to_save": None,
                "alpha_pattern": {}, "layers_to_transform": None, "layer_replication": None, "target_parameters": None}


def load(params: PyTree, directory: str | os.PathLike, *, names: Names = None) -> PyTree:
    """``params`` adapted by the PEFT adapter in ``directory`` (written by PEFT or by
    :func:`save`; a method of :data:`METHODS`): nodes with the file's hyper-parameters and
    arrays. Anything jpeft cannot represent is a ValueError naming the file and the key."""
    config_path, config, weights_path, tensors = checkpoint.read_adapter_files(directory, ADAPTER_CONFIG, ADAPTER_WEIGHTS)
    _refuse_on(config_path, config, {**_UNSUPPORTED, **({} if config.get("peft_type") == "ADALORA" else {"rank_pattern": {}})})
    name = _namer(names)
    by_module = {m: p for p, x in leaves_with_paths(params) if p.endswith("kernel") and (m := name(p))}
    # "<module>.lora_A.weight", "<module>.hra_u": the module is what precedes the array's own name
    modules = sorted({k[len(PREFIX):].removesuffix(".weight").rsplit(".", 1)[0] for k in tensors if k.startswith(PREFIX)})
    unknown = [m for m in modules if m not in by_module]
    if unknown:
        raise ValueError(f"{weights_path}: modules {unknown[:5]} match no kernel of the parameters "
                         f"(e.g. {sorted(by_module)[:3]}); pass names= for this model")
    _check_targets(config_path, weights_path, config, modules, by_module)
    method, hparams = _hparams(config_path, config, modules)
    try:
        make_config(method, **hparams)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: {e}") from None
    adapted = core.apply(params, method, key=jax.random.key(0), targets=[re.escape(by_module[m]) for m in modules],
                         **hparams)
    nodes = {p: x for p, x in leaves_with_paths(adapted) if is_node(x)}
    _check_ia3_biases(adapted, nodes)
    used = set()
    frozen = _vera_frozen(weights_path, tensors, nodes, used) if method == "vera" else {}
    masks = _rank_masks(config_path, config, hparams.get("r")) if method == "adalora" else {}

    def take(path, leaf):
        p = path_str(path)
        if not is_node(leaf):
            return leaf
        module = name(p)
        trainable = {}
        for t in METHODS[method].tensors(leaf.config):
            if t.name not in leaf.trainable:
                continue
            key = f"{PREFIX}{module}.{t.suffix}"
            if key not in tensors:
                raise ValueError(f"{weights_path}: missing tensor {key!r}")
            used.add(key)
            want = leaf.trainable[t.name].shape
            mask = masks.get(module)
            if mask is not None:  # a PEFT AdaLoRA file keeps only the ranks its rank_pattern kept
                want = np.zeros(want)[..., mask].shape if t.name == "a" else np.zeros(want)[mask].shape
            shape = _to_peft(np.zeros(want), t.layout).shape
            if tensors[key].shape != shape:
                raise ValueError(f"{weights_path}: {key!r} has shape {tensors[key].shape}, the model's {p!r} needs {shape}")
            x = _from_peft(tensors[key], t.layout).astype(np.float32)
            if mask is not None:
                full = np.zeros(leaf.trainable[t.name].shape, np.float32)
                full[(..., mask) if t.name == "a" else mask] = x
                x = full
            trainable[t.name] = jnp.asarray(x)
        return leaf.replace(trainable=trainable, frozen={**leaf.frozen, **frozen.get(p, {})})

    adapted = jax.tree_util.tree_map_with_path(take, adapted, is_leaf=is_node)
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ValueError(f"{weights_path}: unexpected tensors {unexpected[:5]} ({len(unexpected)}) that a "
                         f"{config['peft_type']} adapter of these modules does not have")
    return adapted


def _check_targets(config_path: str, weights_path: str, config: dict, modules: list[str], by_module: dict) -> None:
    """The file's tensors cover exactly the modules its ``target_modules`` (less its
    ``exclude_modules``) selects in the model."""
    targets, exclude = config.get("target_modules"), config.get("exclude_modules")
    if targets is None or targets == "all-linear":
        return
    if not isinstance(targets, (str, list)):
        raise ValueError(f"{config_path}: target_modules={targets!r} is neither a list of names nor a regex")
    for entry in [targets] if isinstance(targets, str) else targets:
        if not any(_matches(m, entry if isinstance(targets, str) else [entry]) for m in by_module):
            raise ValueError(f"{config_path}: target_modules entry {entry!r} matches no module of the parameters "
                             f"(e.g. {sorted(by_module)[:3]}); pass names= for this model")
    selected = sorted(m for m in by_module if _matches(m, targets) and not (exclude and _matches(m, exclude)))
    missing = [m for m in selected if m not in modules]
    if missing:
        raise ValueError(f"{weights_path}: missing tensors of modules {missing[:5]}, which target_modules selects")
    extra = [m for m in modules if m not in selected]
    if extra:
        raise ValueError(f"{weights_path}: tensors of modules {extra[:5]}, which target_modules={targets!r} does not select")


def _vera_frozen(weights_path: str, tensors: dict, nodes: dict[str, Node], used: set) -> dict[str, dict]:
    """Each VeRA node's frozen ``a``, ``b``: slices of the file's shared projections, one
    array object per size and dtype (as :func:`jpeft.methods.vera.shared`)."""
    n_max = max(n.shape[0] for n in nodes.values())
    m_max = max(n.shape[1] for n in nodes.values())
    r = next(iter(nodes.values())).config.r
    for key, shape in ((VERA_A, (r, n_max)), (VERA_B, (m_max, r))):
        if key not in tensors:
            raise ValueError(f"{weights_path}: missing tensor {key!r} (VeRA's shared projection)")
        if tensors[key].shape != shape:
            raise ValueError(f"{weights_path}: {key!r} has shape {tensors[key].shape}, the adapted modules need {shape}")
        used.add(key)
    a_full, b_full = tensors[VERA_A].T, tensors[VERA_B].T
    cache = {}

    def piece(name, size, dtype):
        if (name, size, dtype) not in cache:
            x = a_full[:size] if name == "a" else b_full[:, :size]
            cache[(name, size, dtype)] = jnp.asarray(x, dtype)
        return cache[(name, size, dtype)]

    return {p: {"a": piece("a", n.shape[0], n.frozen["kernel"].dtype), "b": piece("b", n.shape[1], n.frozen["kernel"].dtype)}
            for p, n in nodes.items()}


def _rank_masks(config_path: str, config: dict, r: int) -> dict[str, np.ndarray]:
    """AdaLoRA's ``rank_pattern`` (``"<module>.lora_E": [kept, ...]``) by module."""
    pattern = config.get("rank_pattern") or {}
    masks = {}
    for key, kept in pattern.items():
        mask = np.asarray(kept, bool).ravel()
        if mask.shape != (r,):
            raise ValueError(f"{config_path}: rank_pattern[{key!r}] has {mask.size} entries, init_r={r}")
        masks[key.split(".lora_E")[0]] = mask
    return masks
