"""PEFT's adapter files, both directions, proven by loading them in HF PEFT on the same
transformers model (tiny PhiForCausalLM, float32)."""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from transformers import PhiConfig, PhiForCausalLM  # noqa: E402

import jpeft  # noqa: E402
from jpeft import peft_format  # noqa: E402
from jpeft.models import phi  # noqa: E402
from conftest import perturb  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=5,
            max_position_embeddings=64, partial_rotary_factor=0.5)
IDS = np.random.RandomState(0).randint(0, TINY["vocab_size"], (2, 9))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(**TINY)).eval()
    path = tmp_path_factory.mktemp("phi")
    model.save_pretrained(path)
    flax_model, params = phi.from_pretrained(path)
    return str(path), flax_model, params


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def hf_model(path):
    return PhiForCausalLM.from_pretrained(path).eval()


EXPORTED = [("lora", dict(r=4, alpha=8.0, rslora=True)), ("dora", dict(r=4, alpha=8.0)), ("hra", dict(r=4)),
            ("loha", dict(r=2, alpha=4.0)), ("ia3", dict(feedforward=True)),
            ("lokr", dict(r=8, alpha=4.0)), ("oft", dict(block_size=8, side="in")),
            ("oft", dict(block_size=8, side="in", neumann_terms=4)), ("boft", dict(block_size=8, n_butterfly=1))]


@pytest.mark.parametrize("method,hp", EXPORTED)
def test_export_loads_in_peft_and_round_trips(base, tmp_path, method, hp):
    path, model, params = base
    adapted = perturb(jpeft.apply(params, method, key=jax.random.key(1), targets=r".*(q_proj|v_proj|fc1)/kernel", **hp),
                      jax.random.key(2), 0.1)
    peft_format.save(adapted, tmp_path, base_model_name_or_path=path)
    ours = np.asarray(model.apply({"params": adapted}, IDS))
    assert np.abs(ours - np.asarray(model.apply({"params": params}, IDS))).max() > 1e-3  # not at identity
    theirs = peft.PeftModel.from_pretrained(hf_model(path), tmp_path).eval()
    np.testing.assert_allclose(torch_logits(theirs), ours, atol=1e-4, rtol=1e-4)
    merged = theirs.merge_and_unload()
    ours_merged = jpeft.materialize(adapted)["model"]["layers_1"]["mlp"]["fc1"]["kernel"]
    np.testing.assert_allclose(merged.model.layers[1].mlp.fc1.weight.detach().numpy().T, ours_merged, atol=1e-5)
    # jpeft -> PEFT files -> jpeft: the same arrays, bit for bit
    back = peft_format.load(params, tmp_path)
    for a, b in zip(jax.tree_util.tree_leaves(jpeft.partition(adapted)[0]), jax.tree_util.tree_leaves(jpeft.partition(back)[0])):
        np.testing.assert_array_equal(a, b)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(adapted)


PEFT_MADE = {
    "lora": lambda t: peft.LoraConfig(r=4, lora_alpha=16, target_modules=t, init_lora_weights=False, use_rslora=True),
    "dora": lambda t: peft.LoraConfig(r=4, lora_alpha=16, target_modules=t, init_lora_weights=False, use_dora=True),
    "hra": lambda t: peft.HRAConfig(r=4, target_modules=t),
    "loha": lambda t: peft.LoHaConfig(r=2, alpha=4, target_modules=t, init_weights=False),
    "ia3": lambda t: peft.IA3Config(target_modules=t, feedforward_modules=t),
    "lokr": lambda t: peft.LoKrConfig(r=2, alpha=4, target_modules=t),
    "oft": lambda t: peft.OFTConfig(r=0, oft_block_size=8, target_modules=t),  # Cayley-Neumann, 5 terms
    "oft_exact": lambda t: peft.OFTConfig(r=0, oft_block_size=8, target_modules=t, use_cayley_neumann=False),
    "boft": lambda t: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=t),
}


@pytest.mark.parametrize("method", list(PEFT_MADE))
def test_adapters_made_by_peft_load_with_the_same_logits(base, tmp_path, method):
    path, model, params = base
    cfg = PEFT_MADE[method](["k_proj", "dense"])
    theirs = peft.get_peft_model(hf_model(path), cfg).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if any(k in n for k in ("lora_", "hra_", "hada_", "ia3_", "lokr_", "oft_", "boft_")):
                p.add_(0.05 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path)
    adapted = peft_format.load(params, tmp_path)
    nodes = [p for p, x in jpeft.core.leaves_with_paths(adapted) if jpeft.is_node(x)]
    assert len(nodes) == 4 and all(p.endswith(("k_proj/kernel", "dense/kernel")) for p in nodes)
    np.testing.assert_allclose(np.asarray(model.apply({"params": adapted}, IDS)), torch_logits(theirs), atol=1e-4, rtol=1e-4)


REFUSED = [("lokr", dict(r=2), "decompose_both", True, r"decompose_both=True .*has no jpeft counterpart"),
           ("lokr", dict(r=2), "module_dropout", 0.1, r"module_dropout=0.1 has no jpeft counterpart"),
           ("oft", dict(block_size=8, side="in"), "coft", True, r"coft=True has no jpeft counterpart"),
           ("oft", dict(block_size=8, side="in"), "oft_block_size", 0, r"r=0 \(a number of blocks per layer"),
           ("boft", dict(block_size=4), "boft_dropout", 0.1, r"boft_dropout=0.1 \(multiplicative dropout")]


@pytest.mark.parametrize("method,hp,field,value,message", REFUSED)
def test_peft_options_jpeft_lacks_are_refused(base, tmp_path, method, hp, field, value, message):
    _, _, params = base
    peft_format.save(jpeft.apply(params, method, key=jax.random.key(1), targets=r".*q_proj/kernel", **hp), tmp_path)
    config = tmp_path / peft_format.ADAPTER_CONFIG
    config.write_text(json.dumps({**json.loads(config.read_text()), field: value}))
    with pytest.raises(ValueError, match=r"adapter_config.json: " + message):
        peft_format.load(params, tmp_path)


def test_bad_files_name_the_file_and_the_key(base, tmp_path):
    _, _, params = base
    adapted = perturb(jpeft.apply(params, "lora", key=jax.random.key(1), r=2), jax.random.key(2))
    peft_format.save(adapted, tmp_path)
    weights, config = tmp_path / peft_format.ADAPTER_WEIGHTS, tmp_path / peft_format.ADAPTER_CONFIG
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: not a readable safetensors file"):
        peft_format.load(params, tmp_path)
    weights.write_bytes(good)
    cfg = json.loads(config.read_text())
    config.write_text(json.dumps({**cfg, "peft_type": "PROMPT_TUNING"}))
    with pytest.raises(ValueError, match=r"adapter_config.json: peft_type 'PROMPT_TUNING' is not supported"):
        peft_format.load(params, tmp_path)
    config.write_text(json.dumps({**cfg, "bias": "all"}))
    with pytest.raises(ValueError, match=r"bias='all' has no jpeft counterpart"):
        peft_format.load(params, tmp_path)
    config.write_text(json.dumps({**cfg, "r": 3}))
    with pytest.raises(ValueError, match=r"lora_A.weight' has shape \(2, 40\), the model's .* needs \(3, 40\)"):
        peft_format.load(params, tmp_path)
    with pytest.raises(ValueError, match=r"match no kernel of the parameters"):
        peft_format.load(params, tmp_path, names=lambda p: "elsewhere." + peft_format.module_name(p))
    with pytest.raises(ValueError, match=r"PEFT's format is written here for one method of \['boft', 'dora', 'hra', 'ia3', 'loha', 'lokr', 'lora', 'oft'\]"):
        peft_format.save(jpeft.apply(params, "shoft", key=jax.random.key(0), r_u=2, r_v=2), tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")
    with pytest.raises(ValueError, match=r"PEFT's OFT rotates the inputs without a scaling"):
        peft_format.save(jpeft.apply(params, "oft", key=jax.random.key(0), block_size=8), tmp_path / "z")
    assert not os.path.exists(tmp_path / "z")
    with pytest.raises(ValueError, match=r"\(IA\)³ on the outputs of layers with a bias .*use feedforward=True"):
        peft_format.save(jpeft.apply(params, "ia3", key=jax.random.key(0)), tmp_path / "y")
    assert not os.path.exists(tmp_path / "y")


def test_cli_train_peft_out_export_and_eval(tmp_path, capsys):
    from safetensors.numpy import load_file

    from jpeft import cli

    run = tmp_path / "run"
    args = ["--model", "tiny", "--method", "lora", "--tasks", "piqa", "--batch-size", "4", "--dtype", "float32",
            "--max-length", "128"]
    cli.main(["train", *args, "--run-dir", str(run), "--steps", "4", "--warmup-steps", "1", "--lr", "1e-2",
              "--set", "rslora=true", "--peft-out", str(tmp_path / "peft")])
    trained = json.loads((run / "results" / "piqa.json").read_text())
    cli.main(["export", "--model", "tiny", "--adapter", str(run / "adapter"), "--peft", str(tmp_path / "exported")])
    written, exported = (load_file(tmp_path / d / peft_format.ADAPTER_WEIGHTS) for d in ("peft", "exported"))
    assert written.keys() == exported.keys() and len(written) == 2 * 3 * 4  # A, B of Q/K/V in 4 layers
    for k in written:
        np.testing.assert_array_equal(written[k], exported[k])
    assert json.loads((tmp_path / "peft" / peft_format.ADAPTER_CONFIG).read_text())["use_rslora"] is True
    cli.main(["eval", *args, "--peft-adapter", str(tmp_path / "peft"), "--run-dir", str(tmp_path / "eval")])
    again = json.loads((tmp_path / "eval" / "results" / "piqa.json").read_text())
    assert again["predictions"] == trained["predictions"]  # the PEFT files reproduce the trained model
    capsys.readouterr()
    (tmp_path / "peft" / peft_format.ADAPTER_WEIGHTS).write_bytes(b"\0" * 10)
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", *args, "--peft-adapter", str(tmp_path / "peft"), "--run-dir", str(tmp_path / "eval2")])
    assert e.value.code == 2 and "adapter_model.safetensors: not a readable safetensors file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *args, "--method", "shoft", "--run-dir", str(tmp_path / "r2"), "--steps", "1",
                  "--peft-out", str(tmp_path / "p2")])
    assert e.value.code == 2 and "PEFT's format is written here for one method" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists() and not (tmp_path / "p2").exists()
