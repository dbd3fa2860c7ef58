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
from safetensors.numpy import load_file, save_file  # noqa: E402

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
            ("oft", dict(block_size=8, side="in", neumann_terms=4)), ("boft", dict(block_size=8, n_butterfly=1)),
            ("vera", dict(r=8)), ("adalora", dict(r=4, target_r=2, total_step=10)),
            # PEFT's own PiSSA/OLoRA files: the adapter on the residual, which PEFT recomputes from the base on load
            ("lora", dict(r=4, alpha=8.0, init="pissa")), ("lora", dict(r=4, alpha=4.0, init="olora", rslora=True))]


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
    assert json.loads((tmp_path / peft_format.ADAPTER_CONFIG).read_text())["target_modules"] == ["fc1", "q_proj", "v_proj"]
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
    "vera": lambda t: peft.VeraConfig(r=8, target_modules=t, projection_prng_key=5),
    "adalora": lambda t: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=t),
    # after PEFT's budget allocation: the file holds only the kept ranks, listed in rank_pattern
    "adalora_pruned": lambda t: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=t),
    "pissa": lambda t: peft.LoraConfig(r=4, lora_alpha=8, target_modules=t, init_lora_weights="pissa"),
    "olora": lambda t: peft.LoraConfig(r=4, lora_alpha=8, target_modules=t, init_lora_weights="olora"),
}


@pytest.mark.parametrize("method", list(PEFT_MADE))
def test_adapters_made_by_peft_load_with_the_same_logits(base, tmp_path, method):
    path, model, params = base
    cfg = PEFT_MADE[method](["k_proj", "dense"])
    theirs = peft.get_peft_model(hf_model(path), cfg).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if any(k in n for k in ("lora_", "hra_", "hada_", "ia3_", "lokr_", "oft_", "boft_", "vera_lambda")):
                p.add_(0.05 * torch.randn_like(p))
    if method == "adalora_pruned":
        kept = {"self_attn.k_proj": [1, 0, 1, 1], "self_attn.dense": [0, 0, 1, 0], "mlp": None}
        pattern = {f"model.layers.{i}.{m}.lora_E": [bool(k) for k in kept[m]] for i in range(2) for m in kept if kept[m]}
        theirs.peft_config["default"].rank_pattern = pattern
        theirs.base_model.rankallocator.mask_using_rank_pattern(theirs.model, pattern)  # zero the pruned E, as PEFT
    theirs.save_pretrained(tmp_path)
    if method == "adalora_pruned":
        widths = {k: v.shape for k, v in load_file(tmp_path / peft_format.ADAPTER_WEIGHTS).items()}
        assert widths["base_model.model.model.layers.0.self_attn.k_proj.lora_A"] == (3, 40)
        assert widths["base_model.model.model.layers.1.self_attn.dense.lora_B"] == (40, 1)
    adapted = peft_format.load(params, tmp_path)
    nodes = [p for p, x in jpeft.tree.leaves_with_paths(adapted) if jpeft.is_node(x)]
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
    with pytest.raises(ValueError, match=r"PEFT's format is written here for one method of \['adalora', 'boft', 'dora', .*'vera'\]; the tree has \['shoft'\]"):
        peft_format.save(jpeft.apply(params, "shoft", key=jax.random.key(0), r_u=2, r_v=2), tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")
    with pytest.raises(ValueError, match=r"PEFT's OFT rotates the inputs without a scaling"):
        peft_format.save(jpeft.apply(params, "oft", key=jax.random.key(0), block_size=8), tmp_path / "z")
    assert not os.path.exists(tmp_path / "z")
    with pytest.raises(ValueError, match=r"\(IA\)³ on the outputs of layers with a bias .*use feedforward=True"):
        peft_format.save(jpeft.apply(params, "ia3", key=jax.random.key(0)), tmp_path / "y")
    assert not os.path.exists(tmp_path / "y")


def test_cli_train_peft_out_export_and_eval(tmp_path, capsys):
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
    assert not (tmp_path / "eval2").exists()
    cli.main(["export", "--model", "tiny", "--adapter", str(run / "adapter"), "--peft", str(tmp_path / "peft")])
    weights = tmp_path / "peft" / peft_format.ADAPTER_WEIGHTS
    save_file({k: v for k, v in load_file(weights).items() if "layers.3.self_attn.v_proj" not in k}, weights)
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", *args, "--peft-adapter", str(tmp_path / "peft"), "--run-dir", str(tmp_path / "eval3")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "adapter_model.safetensors: missing tensors of modules ['model.layers.3.self_attn.v_proj']" in err
    assert not (tmp_path / "eval3").exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "--model", "tiny", "--adapter", str(tmp_path / "nowhere"), "--peft", str(tmp_path / "p3")])
    assert e.value.code == 2 and "nowhere/adapter_config.json: not a readable adapter config" in capsys.readouterr().err
    assert not (tmp_path / "p3").exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *args, "--method", "shoft", "--run-dir", str(tmp_path / "r2"), "--steps", "1",
                  "--peft-out", str(tmp_path / "p2")])
    assert e.value.code == 2 and "PEFT's format is written here for one method" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists() and not (tmp_path / "p2").exists()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_export_as_plain_lora_of_twice_the_rank(base, tmp_path, init):
    """With ``base``, PiSSA/OLoRA are written as PEFT's weight conversion writes them: a rank-2r
    LoRA on the unchanged base (what LoRA servers load)."""
    path, model, params = base
    adapted = perturb(jpeft.apply(params, "lora", key=jax.random.key(1), targets=r".*(k_proj|fc2)/kernel", r=3,
                                  alpha=6.0, init=init, rslora=init == "olora"), jax.random.key(2), 0.1)
    peft_format.save(adapted, tmp_path, base=params)
    config = json.loads((tmp_path / peft_format.ADAPTER_CONFIG).read_text())
    assert (config["r"], config["init_lora_weights"]) == (6, True)
    assert config["lora_alpha"] == pytest.approx(6.0 * (2**0.5 if init == "olora" else 2))
    ours = np.asarray(model.apply({"params": adapted}, IDS))
    theirs = peft.PeftModel.from_pretrained(hf_model(path), tmp_path).eval()
    np.testing.assert_allclose(torch_logits(theirs), ours, atol=1e-4, rtol=1e-4)
    merged = theirs.merge_and_unload().model.layers[0].mlp.fc2.weight.detach().numpy().T
    np.testing.assert_allclose(merged, jpeft.materialize(adapted)["model"]["layers_0"]["mlp"]["fc2"]["kernel"], atol=1e-5)
    back = peft_format.load(params, tmp_path)  # a plain LoRA of rank 6 on the base, the same weights
    node = back["model"]["layers_0"]["mlp"]["fc2"]["kernel"]
    assert (node.method, node.config.r, node.config.init) == ("lora", 6, "kaiming")
    np.testing.assert_allclose(jpeft.materialize(back)["model"]["layers_0"]["mlp"]["fc2"]["kernel"],
                               jpeft.materialize(adapted)["model"]["layers_0"]["mlp"]["fc2"]["kernel"], atol=1e-5)
    other = jax.tree_util.tree_map(lambda x: x * 1.01, params)
    with pytest.raises(ValueError, match=rf"base: the kernel at 'model/layers_0/.*' is not the one this {init} adapter"):
        peft_format.save(adapted, tmp_path / "other", base=other)
    assert not (tmp_path / "other").exists()


def test_names_missing_and_unexpected_tensors(base, tmp_path):
    _, _, params = base
    adapted = perturb(jpeft.apply(params, "lora", key=jax.random.key(1), targets=r".*layers_1/.*q_proj/kernel", r=2),
                      jax.random.key(2))
    # a dict of names: the module names of another model (what a user passes for non-Phi trees)
    names = {"model/layers_1/self_attn/q_proj/kernel": "transformer.h.1.attn.q"}
    peft_format.save(adapted, tmp_path, names=names)
    config = json.loads((tmp_path / peft_format.ADAPTER_CONFIG).read_text())
    weights = load_file(tmp_path / peft_format.ADAPTER_WEIGHTS)
    assert config["target_modules"] == ["q"] and sorted(weights) == [
        "base_model.model.transformer.h.1.attn.q.lora_A.weight", "base_model.model.transformer.h.1.attn.q.lora_B.weight"]
    back = peft_format.load(params, tmp_path, names=names)
    np.testing.assert_array_equal(back["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"].trainable["b"],
                                  adapted["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"].trainable["b"])
    with pytest.raises(ValueError, match=r"names gives no module name for the node at 'model/layers_1/self_attn/q_proj"):
        peft_format.save(adapted, tmp_path / "x", names={})
    # only layer 1 is adapted: "q_proj" would select layer 0 too, so the full name is written
    peft_format.save(adapted, tmp_path / "phi")
    phi_dir = tmp_path / "phi"
    assert json.loads((phi_dir / peft_format.ADAPTER_CONFIG).read_text())["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    good = load_file(phi_dir / peft_format.ADAPTER_WEIGHTS)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    save_file({k: v for k, v in good.items() if k != key}, phi_dir / peft_format.ADAPTER_WEIGHTS)
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors: missing tensor '{key}'"):
        peft_format.load(params, phi_dir)
    save_file({**good, "base_model.model.model.layers.1.self_attn.q_proj.lora_C.weight": good[key]},
              phi_dir / peft_format.ADAPTER_WEIGHTS)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: unexpected tensors \['base_model.*lora_C.weight'\]"):
        peft_format.load(params, phi_dir)
    save_file(good, phi_dir / peft_format.ADAPTER_WEIGHTS)
    cfg = json.loads((phi_dir / peft_format.ADAPTER_CONFIG).read_text())
    (phi_dir / peft_format.ADAPTER_CONFIG).write_text(json.dumps({**cfg, "target_modules": ["q_proj", "c_attn"]}))
    with pytest.raises(ValueError, match=r"adapter_config.json: target_modules entry 'c_attn' matches no module"):
        peft_format.load(params, phi_dir)
    (phi_dir / peft_format.ADAPTER_CONFIG).write_text(json.dumps({**cfg, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match=r"missing tensors of modules \['model.layers.0.self_attn.q_proj'\], which "
                                         r"target_modules selects"):
        peft_format.load(params, phi_dir)
    (phi_dir / peft_format.ADAPTER_CONFIG).write_text(json.dumps({**cfg, "peft_type": "VERA", "save_projection": False}))
    with pytest.raises(ValueError, match=r"save_projection=False: PEFT rebuilds the projections"):
        peft_format.load(params, phi_dir)
    (phi_dir / peft_format.ADAPTER_CONFIG).write_text(json.dumps({**cfg, "init_lora_weights": "loftq"}))
    with pytest.raises(ValueError, match=r"init_lora_weights='loftq' has no jpeft counterpart"):
        peft_format.load(params, phi_dir)
    (phi_dir / peft_format.ADAPTER_CONFIG).write_text(json.dumps({**cfg, "lora_dropout": 1.5}))
    with pytest.raises(ValueError, match=r"adapter_config.json: .*dropout"):
        peft_format.load(params, phi_dir)


def test_boft_with_two_butterfly_factors_matches_peft_equations(base, tmp_path):
    """PEFT builds more than one butterfly factor only with its CUDA extension (on CPU it resets
    boft_n_butterfly_factor to 1). Reference: PEFT's own permutation and Cayley code on the file's
    boft_R, each factor's block diagonal built as the extension builds it, in float64."""
    path, _, params = base
    adapted = perturb(jpeft.apply(params, "boft", key=jax.random.key(1), targets=r".*fc2/kernel", block_size=4,
                                  n_butterfly=2), jax.random.key(2), 0.1)
    peft_format.save(adapted, tmp_path)
    assert json.loads((tmp_path / peft_format.ADAPTER_CONFIG).read_text())["boft_n_butterfly_factor"] == 2
    weights = load_file(tmp_path / peft_format.ADAPTER_WEIGHTS)
    layer = peft.get_peft_model(hf_model(path), peft.BOFTConfig(boft_block_size=4, target_modules=["fc2"])
                                ).base_model.model.model.layers[0].mlp.fc2  # for its methods only
    boft_r = torch.tensor(weights["base_model.model.model.layers.0.mlp.fc2.boft_R"], dtype=torch.float64)
    boft_s = torch.tensor(weights["base_model.model.model.layers.0.mlp.fc2.boft_s"], dtype=torch.float64)
    factors, blocks, size, _ = boft_r.shape
    assert (factors, blocks, size) == (2, 16, 4)  # fc2's 64 inputs
    rotation = torch.eye(64, dtype=torch.float64)
    for i in range(factors):
        perm = layer.perm2mat(layer.block_butterfly_perm(64, blocks // 2**i, size // 2, factors - 1)).double()
        block_diagonal = torch.block_diag(*layer.cayley_batch(boft_r[i]))
        rotation = perm @ block_diagonal @ perm.T @ rotation
    weight = hf_model(path).model.layers[0].mlp.fc2.weight.detach().double()
    merged = (rotation @ weight.T).T * boft_s
    ours = jpeft.materialize(adapted)["model"]["layers_0"]["mlp"]["fc2"]["kernel"]
    np.testing.assert_allclose(merged.numpy().T, ours, atol=1e-5)
    back = peft_format.load(params, tmp_path)
    np.testing.assert_array_equal(back["model"]["layers_0"]["mlp"]["fc2"]["kernel"].trainable["blocks"],
                                  adapted["model"]["layers_0"]["mlp"]["fc2"]["kernel"].trainable["blocks"])
