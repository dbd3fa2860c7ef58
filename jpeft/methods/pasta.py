"""PaSTA: parameter-efficient tuning with special token adaptation (Yang, Huang, Zhou & Chen,
EACL 2023, "Parameter-Efficient Tuning with Special Token Adaptation").

The model is frozen; before each chosen layer ``l`` (residual site ``"input"``: the stream
entering the layer, which the layer's residual connection carries on) a trainable vector is
added to the hidden state of each special token of the input sequence:

    H^l ← H^l + M^l,    m_i^l = e(v_p^l) if token i is the p-th special token of the
                        sequence, else 0,    e(v_p^l) ∈ R^d.

The vectors are indexed by the special token's *order* among the special tokens of the
sequence (the paper's ``v_p``, the p-th special token), not by its identity: the authors'
code (``PASTA_modeling.py``, ``BertPastaLayer``) holds ``num_special_tokens`` vectors per
layer, sets it per task to the number of special tokens in a sequence (2 for single-sentence
GLUE tasks, ``[CLS] x [SEP]``; 3 for pairs, ``[CLS] a [SEP] b [SEP]``), and adds vector ``p``
at the p-th special position of each row. Here ``num_special`` is that count; a sequence's
special tokens past it are left as they are (the authors' code asserts there are none).

Special tokens are recognized by their ids in ``context.input_ids`` (``token_ids``, default:
the model's, :attr:`jpeft.hooks.ModelDims.special_token_ids`; virtual tokens, id -1, are
none). A model called with ``inputs_embeds`` has no ids: the hook raises ValueError.
Padding (``context.attention_mask`` false) is not counted, so a padded row gets the vectors
its unpadded form gets (a pad id is often a special id). In cached
generation each pass counts its own tokens: a special token generated after the prompt
restarts at vector 0 (Phi's only special token is EOS, after which a row is done).

Init: ``init_std=0`` (default) starts every vector at zero, so the adapted model is the
base model; ``init_std=0.02`` reproduces the authors' draw (their vectors are an
``nn.Embedding`` that BERT's ``_init_weights`` fills with ``N(0, initializer_range²)``).
``dropout`` applies to the added vectors in training (the authors use the model's hidden
dropout, 0.1 for BERT; Phi-1.5's is 0).

Defaults: every layer, ``num_special = len(token_ids)``. Parameters: layers × num_special ×
d (Phi-1.5, whose only special token is ``<|endoftext|>``: 24 × 1 × 2048 = 49,152); the
frozen ``token_ids`` array holds the ids the hook matches.

Hook point: ``"residual"``, site ``"input"`` (:mod:`jpeft.hooks`). Arrays: ``embedding``
(layers, num_special, d), one row of the leading axis per chosen layer (in increasing layer
order).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.methods import base
from jpeft.methods.loreft import check_layers, flat_draw, layer_slot, layer_tuple
from jpeft.node import Node

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PastaConfig:
    """token_ids: the special token ids (``None``: the model's); num_special: how many special
    tokens of a sequence get a vector of their own (``None``: as many as ``token_ids``);
    layers: the layers whose input is adapted (``None``: every layer); init_std: standard
    deviation of the initial vectors (0: zeros); dropout: rate on the added vectors in training."""

    token_ids: tuple[int, ...] | None = None
    num_special: int | None = None
    layers: tuple[int, ...] | None = None
    init_std: float = 0.0
    dropout: float = 0.0

    def __post_init__(self):
        if self.token_ids is not None:
            ids = (self.token_ids,) if isinstance(self.token_ids, int) else tuple(self.token_ids)
            base.require(len(ids) > 0, "token_ids is empty: pass the tokenizer's special token ids (e.g. "
                                       "tokenizer.all_special_ids), or None for the model's")
            for i in ids:
                base.non_negative_int("each of token_ids", i)
            base.require(len(set(ids)) == len(ids), f"token_ids has repeated ids: {list(ids)}")
            object.__setattr__(self, "token_ids", ids)
        if self.num_special is not None:
            base.positive_int("num_special", self.num_special)
        object.__setattr__(self, "layers", layer_tuple("layers", self.layers))
        base.require(not isinstance(self.init_std, bool) and isinstance(self.init_std, (int, float))
                     and self.init_std >= 0, f"init_std must be a non-negative number, got {self.init_std!r}")
        base.probability("dropout", self.dropout)

    def resolved_ids(self, dims) -> tuple[int, ...]:
        """The special token ids the hook matches: ``token_ids``, else the model's."""
        ids = self.token_ids if self.token_ids is not None else tuple(dims.special_token_ids)
        base.require(len(ids) > 0, "pasta adapts special tokens, but the model declares none "
                                   "(jpeft.hooks.ModelDims.special_token_ids is empty): pass token_ids=(...), the "
                                   "tokenizer's special token ids (e.g. tokenizer.all_special_ids)")
        return ids

    def check(self, dims) -> None:
        ids = self.resolved_ids(dims)
        bad = [i for i in ids if i >= dims.vocab_size]
        base.require(not bad, f"token_ids {bad} are not below the vocabulary size {dims.vocab_size}")
        check_layers(self.layers, dims)


def init(key, dims, config: PastaConfig, params):
    ids = config.resolved_ids(dims)
    n = dims.layers if config.layers is None else len(config.layers)
    shape = (n, config.num_special or len(ids), dims.hidden)
    embedding = config.init_std * flat_draw(jax.random.normal, key, shape) if config.init_std else jnp.zeros(shape)
    return {"embedding": embedding}, {"token_ids": jnp.asarray(np.asarray(ids, np.int32))}


def special_order(input_ids: Array, attention_mask: Array | None, token_ids: Array) -> Array:
    """(batch, length) int: ``p`` at the p-th special token of each row (0-based), -1 elsewhere.

    Padding (``attention_mask`` false) is not a token, whatever its id (Phi pads with its
    special end-of-text token); a pass that continues a sequence counts from its start."""
    special = jnp.isin(input_ids, token_ids)
    if attention_mask is not None:
        special = special & attention_mask.astype(bool)
    return jnp.where(special, jnp.cumsum(special, axis=-1) - 1, -1)


def additions(node: Node, slot: int, context) -> Array:
    """(batch, length, d) float32: ``M^l`` of the layer at ``slot``."""
    if context.input_ids is None:
        raise ValueError("pasta recognizes special tokens by their ids, but the model was called with inputs_embeds: "
                         "call it with input_ids")
    order = special_order(context.input_ids, context.attention_mask, node.frozen["token_ids"])
    vectors = node.trainable["embedding"][slot]
    pick = (order[..., None] == jnp.arange(vectors.shape[0])).astype(vectors.dtype)  # none past num_special
    return pick @ vectors


def residual(node: Node, layer: int, site: str, out: Array, inp: Array, context, key: Array | None) -> Array:
    slot = layer_slot(node.config.layers, layer)
    if site != "input" or slot is None:
        return out
    add = base.dropout(additions(node, slot, context), node.config.dropout, key)
    return out + add.astype(out.dtype)


METHOD = base.Method(PastaConfig, init, scope="model",
                     hooks=base.Hooks(points=("residual",), residual=residual, uses_key=lambda c: c.dropout > 0))
