"""Parameter-count tables computed from shapes only (no weights are allocated)."""

from __future__ import annotations

import math
from typing import Any, Iterable

import jax

from jpeft import core, quantized
from jpeft.methods.registry import make_config
from jpeft.node import is_quantized

PyTree = Any


def count_table(
    abstract_params: PyTree,
    methods: Iterable[str],
    *,
    targets=None,
    hparams: dict[str, dict] | None = None,
    quantize: str | None = None,
    model: Any = None,
) -> list[dict]:
    """One row per method: trainable, frozen and total counts of ``apply`` on shapes, and
    the bytes of the frozen arrays.

    ``abstract_params`` is a tree of ``jax.ShapeDtypeStruct`` (e.g. from
    ``jax.eval_shape``); each method runs under ``jax.eval_shape`` so nothing is allocated.
    ``hparams[method]`` overrides the method's defaults (the thesis' settings); ``quantize``
    (``"nf4"``, ...) quantizes the base first (:func:`jpeft.quantize`'s defaults: QLoRA).
    ``model`` (a model with ``jpeft_dims()`` or its :class:`jpeft.hooks.ModelDims`) places
    the methods that add computation; ``targets`` the others.
    """
    hparams = hparams or {}
    base_total = sum(x.size for x in jax.tree_util.tree_leaves(abstract_params))
    rows = [{"method": "full fine-tuning", "hparams": "", "trainable": base_total, "frozen": 0, "total": base_total,
             "frozen_bytes": 0}]
    if quantize is not None:
        abstract_params = jax.eval_shape(lambda p: quantized.quantize(p, quantize), abstract_params)
    for method in methods:
        hp = hparams.get(method, {})
        adapted = jax.eval_shape(
            lambda p, hp=hp, method=method: core.apply(p, method, key=jax.random.key(0),
                                                       **core.targets_for(method, targets, model), **hp), abstract_params
        )
        counts = core.count_params(adapted)
        config = make_config(method, **hp)
        rows.append(
            {
                "method": method,
                "hparams": ", ".join(f"{k}={v}" for k, v in vars(config).items()),
                "trainable": counts["trainable"],
                "frozen": counts["frozen"],
                "total": counts["total"],
                "frozen_bytes": counts["frozen_bytes"],
                "targets": len(counts["targets"]),
            }
        )
    for row in rows:
        row["trainable_pct"] = 100.0 * row["trainable"] / base_total
    return rows


def format_table(rows: list[dict], frozen_bytes: bool = False) -> str:
    """A markdown table of :func:`count_table` rows (with ``frozen_bytes``: their frozen MiB
    and bytes per frozen parameter)."""
    extra = " frozen MiB | bytes / frozen param |" if frozen_bytes else ""
    lines = [
        "| method | hyper-parameters | trainable | % of base | frozen | total |" + extra,
        "|---|---|---:|---:|---:|---:|" + ("---:|---:|" if frozen_bytes else ""),
    ]
    for r in rows:
        line = f"| {r['method']} | {r['hparams']} | {r['trainable']:,} | {r['trainable_pct']:.3f} | {r['frozen']:,} | {r['total']:,} |"
        if frozen_bytes:
            per_param = r["frozen_bytes"] / r["frozen"] if r["frozen"] else 0.0
            line += f" {r['frozen_bytes'] / 2**20:,.1f} | {per_param:.3f} |"
        lines.append(line)
    return "\n".join(lines)


def quantized_memory(abstract_params: PyTree, quantize: str) -> dict:
    """Bytes of the base quantized with ``quantize`` (shapes only): ``quantized_params`` /
    ``quantized_bytes`` (codes and scales) and ``other_params`` / ``other_bytes`` (the
    leaves left as they are: embeddings, norms, biases, the output head)."""
    tree = jax.eval_shape(lambda p: quantized.quantize(p, quantize), abstract_params)
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_quantized)
    q = [x for x in leaves if is_quantized(x)]
    rest = [x for x in leaves if not is_quantized(x)]
    return {"quantized_params": sum(math.prod(x.shape) for x in q), "quantized_bytes": sum(x.nbytes for x in q),
            "other_params": sum(math.prod(x.shape) for x in rest),
            "other_bytes": sum(math.prod(x.shape) * x.dtype.itemsize for x in rest)}
