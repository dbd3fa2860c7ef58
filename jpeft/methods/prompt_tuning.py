"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

P trainable virtual-token embeddings ``E ∈ R^{P×d}`` are prepended to the token
embeddings of every sequence, ``[E; embed(x)]``; the model is frozen. The virtual tokens
are attended like tokens and take the first P positions; the model returns the logits of
the real tokens only (HF PEFT's ``PromptTuningConfig`` returns all P + T; the last T are
the same numbers).

Init (PEFT's ``prompt_tuning_init``): ``"random"`` (PEFT's default), ``E ~ N(0, 1)`` as
``torch.nn.Embedding`` draws; ``"text"``, rows of the model's token embedding for
``init_text_ids`` (the tokenized init text), repeated to P and cut at P, as PEFT does:
PEFT's ``"TEXT"`` takes ``tokenizer(prompt_tuning_init_text)["input_ids"]`` with the
tokenizer at ``tokenizer_name_or_path``, so those ids give its rows exactly. ``E`` is
PEFT's ``embedding.weight``; ``"SAMPLE_VOCAB"`` has no counterpart here.

Hook point: ``"embeddings"`` (:mod:`jpeft.hooks`). Parameters: P·d (Phi-1.5 at P = 20:
40,960).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.methods import base
from jpeft.node import Node
from jpeft.tree import leaves_with_paths

INITS = ("random", "text")


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig:
    num_virtual_tokens: int = 20
    init: str = "random"
    init_text_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        base.positive_int("num_virtual_tokens", self.num_virtual_tokens)
        base.require(self.init in INITS, f"init must be one of {INITS}, got {self.init!r}")
        if self.init == "text":
            ids = self.init_text_ids
            base.require(ids is not None and len(ids) > 0 and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                                  for i in ids),
                         f"init='text' needs init_text_ids, the non-empty token ids of the init text, got {ids!r}")
            object.__setattr__(self, "init_text_ids", tuple(ids))
        else:
            base.require(self.init_text_ids is None, "init_text_ids is used only with init='text'")

    def check(self, dims) -> None:
        check_virtual_tokens(self.num_virtual_tokens, dims)
        if self.init == "text":
            bad = [i for i in self.init_text_ids if i >= dims.vocab_size]
            base.require(not bad, f"init_text_ids {bad[:5]} are not below the vocabulary size {dims.vocab_size}")


def check_virtual_tokens(p: int, dims) -> None:
    """ValueError unless ``p`` virtual tokens leave room for at least one real token."""
    base.require(p < dims.max_positions, f"num_virtual_tokens={p} leaves no room for a token in the model's "
                                         f"{dims.max_positions} positions (max_position_embeddings)")


def _embedding_rows(params, dims, ids) -> jax.Array:
    table = dict(leaves_with_paths(params)).get(dims.embedding)
    if table is None:
        raise ValueError(f"init='text' copies rows of the token embedding, but params have no {dims.embedding!r}")
    return jnp.asarray(table)[jnp.asarray(ids)].astype(jnp.float32)


def init(key, dims, config: PromptTuningConfig, params):
    p = config.num_virtual_tokens
    if config.init == "random":
        return {"embedding": jax.random.normal(key, (p, dims.hidden), jnp.float32)}, {}
    ids = np.resize(np.asarray(config.init_text_ids), p)  # repeated to P, cut at P (PEFT)
    return {"embedding": _embedding_rows(params, dims, ids)}, {}


def embeddings(node: Node) -> jax.Array:
    return node.trainable["embedding"]


def num_tokens(node: Node) -> int:
    return node.config.num_virtual_tokens


METHOD = base.Method(PromptTuningConfig, init, scope="model",
                     hooks=base.Hooks(points=("embeddings",), num_tokens=num_tokens, embeddings=embeddings))
