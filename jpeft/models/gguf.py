"""Reading GGUF files (llama.cpp's format) into Hugging Face's names, layout and tokenizer.

    cfg = gguf.config("model.gguf")           # a config.json-style dict for LlamaConfig / Qwen2Config
    for name, array in gguf.tensors("model.gguf"):   # "model.layers.0.self_attn.q_proj.weight", float32 (out, in)
        ...
    tok = gguf.tokenizer("model.gguf")        # a transformers fast tokenizer, chat template kept

Everything goes through the ``gguf`` package's pure-numpy reader (``gguf.GGUFReader``, a memory
map) and ``gguf.quants.dequantize``, and matches what transformers' own GGUF loader
(``from_pretrained(dir, gguf_file=...)``) gives for the architectures read here, ``llama`` and
``qwen2``. A file that is not GGUF, is cut short or describes something else is a ValueError
naming it.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from typing import Any

import gguf as _gguf
import numpy as np

__all__ = ["ARCHITECTURES", "config", "tensor_names", "tensors", "tokenizer"]

#: ``general.architecture`` -> (transformers ``model_type``, its causal-LM class)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
}

# GGUF tensor name (without .weight/.bias) -> Hugging Face name; N is the block index.
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL = re.compile(r"(\w+)\.(weight|bias)")
_MISSING = object()


# --------------------------------------------------------------------------- the file


class _Damaged(Exception):
    """Why a file cannot be read; :func:`_reader` puts the caller's path in front."""


@functools.lru_cache(maxsize=1)
def _reader_at(path: str, _inode: int, _size: int, _mtime_ns: int) -> _gguf.GGUFReader:
    # GGUFReader builds one numpy view per vocabulary entry (seconds for a 49k vocabulary), so the
    # last file read is kept: config(), tensors() and tokenizer() on one file parse it once. The
    # stat fields in the key make a replaced or rewritten file a new entry.
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise _Damaged(f"is not a GGUF file: it starts with {magic!r}, not b'GGUF'")
    try:
        reader = _gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways on a damaged file (IndexError, ValueError, ...)
        raise _Damaged(f"is not a readable GGUF file (damaged or cut short?): {type(e).__name__}: {e}") from e
    # The reader maps whatever bytes exist; a tensor reaching past the end means the file was cut.
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > _size or t.data.nbytes != t.n_bytes:
            raise _Damaged(f"is cut short: tensor {t.name} needs bytes {t.data_offset}.."
                           f"{t.data_offset + t.n_bytes} of a {_size}-byte file")
    return reader


def _reader(path: str | os.PathLike) -> tuple[str, _gguf.GGUFReader]:
    path = os.fspath(path)
    st = os.stat(path)  # a missing file stays FileNotFoundError
    if st.st_size == 0:
        raise ValueError(f"{path} is not a GGUF file: it is empty")
    try:
        return path, _reader_at(os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    except _Damaged as e:
        raise ValueError(f"{path} {e}") from e.__cause__


def _field(reader: _gguf.GGUFReader, key: str, default: Any = _MISSING, *, path: str = "") -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"{path}: GGUF metadata has no {key!r}")
        return default
    return field.contents()


def _architecture(path: str, reader: _gguf.GGUFReader) -> str:
    arch = _field(reader, "general.architecture", None)
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; jpeft reads "
                         f"{', '.join(ARCHITECTURES)}")
    return arch


def _single(path: str, key: str, value: Any) -> Any:
    # Some files store a per-layer list (e.g. head_count_kv); a uniform one is that number.
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"{path}: {key} varies across layers ({value}); jpeft reads uniform layers only")
        return value[0]
    return value


# --------------------------------------------------------------------------- config


def config(path: str | os.PathLike) -> dict[str, Any]:
    """A Hugging Face ``config.json``-style dict (for ``LlamaConfig`` / ``Qwen2Config``) built
    from the file's metadata.

    Shape keys come from ``{arch}.*`` (``embedding_length``, ``block_count``, ...), the token ids
    from ``tokenizer.ggml.*``; ``tie_word_embeddings`` is True when the file has no
    ``output.weight`` (llama.cpp writes the output projection only when it differs from the
    embedding). Linear RoPE scaling becomes ``rope_scaling``; anything this port would run
    wrongly (other scaling types, llama.cpp's ``rope_freqs`` factors, experts, partial rotary,
    attention biases on only some projections) is a ValueError naming the file and the feature.
    """
    path, reader = _reader(path)
    arch = _architecture(path, reader)
    model_type, cls = ARCHITECTURES[arch]
    get = lambda key, default=_MISSING: _single(path, key, _field(reader, f"{arch}.{key}", default, path=path))  # noqa: E731
    names = {t.name for t in reader.tensors}

    if get("expert_count", 0):
        raise ValueError(f"{path}: a mixture of experts ({arch}.expert_count={get('expert_count')}) is not supported")
    if "rope_freqs.weight" in names:
        # Llama 3.1-style RoPE: llama.cpp stores per-frequency factors, which no HF rope type here reproduces.
        raise ValueError(f"{path}: RoPE frequency factors (tensor rope_freqs.weight, Llama 3.1-style rope "
                         f"scaling) are not supported")

    hidden = get("embedding_length")
    heads = get("attention.head_count")
    kv_heads = get("attention.head_count_kv", heads)
    # llama.cpp writes key_length only for an explicit head_dim; rope.dimension_count is the rotary
    # width, the whole head for these architectures (transformers reads llama's head_dim from it).
    rope_dim = get("rope.dimension_count", None)
    head_dim = get("attention.key_length", None) or rope_dim or hidden // heads
    if get("attention.value_length", head_dim) != head_dim:
        raise ValueError(f"{path}: value heads ({get('attention.value_length')}) differ from key heads ({head_dim})")
    if rope_dim is not None and rope_dim != head_dim:
        raise ValueError(f"{path}: partial rotary embedding (rope.dimension_count={rope_dim} of head_dim "
                         f"{head_dim}) is not supported")

    vocab = get("vocab_size", None)
    if vocab is None:  # older converters leave it out: the token list has the embedding's length
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError(f"{path}: GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
        vocab = len(tokens.data)  # counted without decoding the strings

    def biases(parts: tuple[str, ...]) -> bool:
        # Biases are all there or none (LlamaConfig has one switch for each group), judged on block 0.
        have = [f"blk.0.{p}.bias" in names for p in parts]
        if any(have) and not all(have):
            raise ValueError(f"{path}: biases on only some of {', '.join(parts)} are not supported")
        return all(have)

    cfg: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [cls],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": get("context_length"),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id", None),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id", None),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
    }
    if arch == "llama":
        cfg["attention_bias"] = biases(("attn_q", "attn_k", "attn_v", "attn_output"))
        cfg["mlp_bias"] = biases(("ffn_gate", "ffn_up", "ffn_down"))
    else:  # Qwen2 always has Q/K/V biases and none elsewhere
        cfg["attention_bias"] = True
        cfg["mlp_bias"] = False

    scaling = get("rope.scaling.type", None)
    factor = get("rope.scaling.factor", None)
    if scaling is None and get("rope.scale_linear", None) is not None:  # the key older converters wrote
        scaling, factor = "linear", get("rope.scale_linear")
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    elif scaling not in (None, "none"):
        raise ValueError(f"{path}: RoPE scaling type {scaling!r} is not supported (jpeft reads 'linear')")
    return cfg


# --------------------------------------------------------------------------- tensors


def _hf_name(path: str, name: str) -> str:
    if m := _BLOCK.fullmatch(name):
        block, part, kind = m.groups()
        if part in _BLOCK_NAMES:
            return f"model.layers.{block}.{_BLOCK_NAMES[part]}.{kind}"
    elif (m := _GLOBAL.fullmatch(name)) and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"{path}: tensor {name} has no Hugging Face name in jpeft's llama/qwen2 mapping")


def tensor_names(path: str | os.PathLike) -> list[str]:
    """The Hugging Face names of the file's tensors, in file order, without reading any data."""
    path, reader = _reader(path)
    _architecture(path, reader)
    return [_hf_name(path, t.name) for t in reader.tensors]


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter reorders each Q/K head's rows from HF's half-split rotary layout to
    # interleaved pairs: w.reshape(n_head, 2, d, ...).swapaxes(1, 2). This is its inverse, as in
    # transformers' LlamaTensorProcessor._reverse_permute_weights (biases too: ".attn_q." matches).
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@functools.cache
def _readable(kind: _gguf.GGMLQuantizationType) -> bool:
    """Whether the installed gguf package dequantizes ``kind`` (probed on one zero block)."""
    if kind in (_gguf.GGMLQuantizationType.F32, _gguf.GGMLQuantizationType.F16, _gguf.GGMLQuantizationType.F64):
        return True
    if kind.name.startswith("I") and kind.name[1:].isdigit():  # I8..I64: integers, never weights
        return False
    try:
        _gguf.quants.dequantize(np.zeros(_gguf.GGML_QUANT_SIZES[kind][1], np.uint8), kind)
    except NotImplementedError:
        return False
    return True


def _dequantize(t: Any) -> np.ndarray:
    kind = _gguf.GGMLQuantizationType(t.tensor_type)
    if kind == _gguf.GGMLQuantizationType.F64:  # plain, but dequantize() has no case for it
        array = np.asarray(t.data, dtype=np.float32)
    else:
        array = _gguf.quants.dequantize(t.data, kind)
    # GGUF lists dims innermost first: reversed, they are PyTorch's (out, in).
    return array.reshape(tuple(int(d) for d in reversed(t.shape)))


def tensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of the file as ``(Hugging Face name, float32 array)``, one at a time.

    Arrays are in the Hugging Face PyTorch layout ((out, in) for Linear weights), every type the
    ``gguf`` package can dequantize (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, the K-quants, ...)
    turned into float32; llama.cpp's Q/K row order is undone for ``llama`` (``qwen2`` files are
    written without it). A tied file yields no ``lm_head.weight``. The metadata (:func:`config`),
    every name and every type are checked here, before any tensor is read: one that cannot be
    read, or has no Hugging Face name, is a ValueError naming it and the file.
    """
    path, reader = _reader(path)
    cfg = config(path)
    names = tensor_names(path)
    for t in reader.tensors:
        kind = _gguf.GGMLQuantizationType(t.tensor_type)
        if not _readable(kind):
            raise ValueError(f"{path}: tensor {t.name} has type {kind.name}, which the installed gguf "
                             f"package cannot dequantize")
    permute = {}
    if _architecture(path, reader) == "llama":
        permute = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}

    def read() -> Iterator[tuple[str, np.ndarray]]:
        for t, name in zip(reader.tensors, names):
            array = _dequantize(t)
            if (m := _BLOCK.fullmatch(t.name)) and m.group(2) in permute:
                array = _unpermute(array, permute[m.group(2)])
            # a copy: never a view of the memory map (F32 arrives as one), and float32 whatever came in
            yield name, np.array(array, dtype=np.float32, order="C", copy=True)

    return read()


# --------------------------------------------------------------------------- tokenizer

# Split patterns of the pre-tokenizer types (tokenizer.ggml.pre) whose regex is not GPT-2's,
# as transformers maps them (integrations/gguf/gguf_tokenizer_mapping.py); any other type gets
# byte-level BPE's own GPT-2 split, as there.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


@functools.cache
def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet byte-level vocabularies are spelled in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return chars


def tokenizer(path: str | os.PathLike):
    """A ``transformers.PreTrainedTokenizerFast`` built from the file's metadata.

    Reads ``tokenizer.ggml.model`` ``"gpt2"`` (byte-level BPE: ``tokens`` and ``merges``): tokens
    marked control become special added tokens, user-defined ones plain added tokens; bos / eos /
    unk / pad come from their ids, ``add_bos_token`` / ``add_eos_token`` from the file, and
    ``tokenizer.chat_template`` is the tokenizer's chat template. Token ids equal those of
    ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``. Another tokenizer model is a ValueError.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path, reader = _reader(path)
    get = lambda key, default=_MISSING: _field(reader, f"tokenizer.{key}", default, path=path)  # noqa: E731
    kind = get("ggml.model", None)
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer model {kind!r} is not supported; jpeft reads 'gpt2' (byte-level BPE)")
    tokens: list[str] = get("ggml.tokens")
    types: list[int] = get("ggml.token_type", [])
    merges: list[str] = get("ggml.merges")

    # Tokens outside the byte alphabet (a raw space, say) are respelled byte by byte, as
    # transformers does, so the merges (always spelled in the alphabet) find them.
    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], dropout=None,
                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    backend = Tokenizer(bpe)
    split = _SPLITS.get(get("ggml.pre", None))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    # Control tokens stay whole in text and are skipped when decoding; one spelled outside the
    # byte alphabet is a llama.cpp mislabel and would grow the vocabulary, so (as in transformers)
    # it is left out. User-defined ones (e.g. <think>) stay whole too but are not special.
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab])

    def token(key: str) -> str | None:
        i = get(f"ggml.{key}", None)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    kwargs = dict(bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
                  unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
                  add_bos_token=bool(get("ggml.add_bos_token", False)),
                  add_eos_token=bool(get("ggml.add_eos_token", False)))
    template = get("chat_template", None)
    if template is not None:
        kwargs["chat_template"] = template
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
