"""The method registry: every method by name (the built-in ones of :mod:`jpeft.methods`
and those added with :func:`register`), and the validated config of a method."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from jpeft.methods import BUILTIN
from jpeft.methods.base import Method

#: Registry of methods by name; extend it with :func:`register`.
methods: dict[str, Method] = dict(BUILTIN)


def register(name: str, method: Method, *, overwrite: bool = False) -> None:
    """Add a user-defined :class:`Method` to :data:`methods` under ``name``."""
    if not isinstance(method, Method):
        raise TypeError(f"register({name!r}, ...) expects a jpeft.Method, got {type(method).__name__}")
    if name in methods and not overwrite:
        raise ValueError(f"a method named {name!r} is already registered (pass overwrite=True to replace it)")
    methods[name] = method


@dataclasses.dataclass(frozen=True)
class _NoConfig:
    def check(self, shape: tuple[int, int]) -> None:
        pass


#: the method name of a quantized kernel that no method adapts, as :func:`jpeft.core.quantized_node`
#: wraps it for ``jpeft.wrap``; not in the registry (nothing to train, not a PEFT method)
QUANTIZED = "quantized"
_QUANTIZED_METHOD = Method(
    _NoConfig,
    init=lambda key, kernel, config: ({}, {"kernel": kernel}),
    materialize=lambda node: node.frozen["kernel"].astype(jnp.float32),
    factored=lambda x, node, dropout_key=None: x @ node.frozen["kernel"].astype(x.dtype),
    flops=lambda node, tokens: (0.0, 0.0),
)


def get_method(name: str) -> Method:
    """The method registered as ``name`` (ValueError naming the known ones for another name)."""
    if name == QUANTIZED:
        return _QUANTIZED_METHOD
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(methods))}")
    return methods[name]


def make_config(method: str, **hparams) -> Any:
    """The validated config dataclass of ``method`` (TypeError on an unknown hyper-parameter)."""
    cls = get_method(method).config
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(hparams) - set(known))
    if unknown:
        raise TypeError(f"method {method!r} got unknown hyper-parameter(s) {unknown}; valid: {known}")
    # NumPy scalars (np.int64(4), np.float32(16)) become the Python values configs hold and hash
    return cls(**{k: v.item() if isinstance(v, np.generic) else v for k, v in hparams.items()})
