"""End-to-end runs used by the CLI and ``experiments/``: load, adapt, train, evaluate, export.

A run directory holds ``run.json`` (the full configuration), ``log.jsonl``,
``checkpoints/``, ``adapter/`` (adapter-only export), ``results/{task}.json`` and, on
request, ``merged/`` (the merged model in Hugging Face format).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jpeft import checkpoint, core, data, eval as evaluation, peft_format, quantized, sharding, train
from jpeft import models
from jpeft.models import layers, llama

PyTree = Any


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What to fine-tune, on what, with what. ``model`` is a real model (``smollm2-135m``), a
    named configuration (``tiny``, ``phi-1.5``, ``llama-small``: random weights), a ``.gguf``
    file or a Hugging Face checkpoint directory / hub id (Phi, Llama, Mistral, Qwen2)."""

    model: str = "tiny"
    method: str = "lora"
    hparams: dict = dataclasses.field(default_factory=dict)
    targets: tuple[str, ...] | None = None
    also_train: tuple[str, ...] | None = None  # regexes of further leaves to train fully (biases, norms, a head)
    tasks: tuple[str, ...] = ("piqa",)
    template: str = "promptsource"  # the tasks' prompts and choices: promptsource (the thesis') or harness (jpeft.data)
    data_dir: str | None = None  # {task}/{split}.jsonl|json|parquet; None: bundled samples (or the hub)
    instructions: str | None = None  # an LLM-Adapters json file to train on instead of the tasks' train splits
    tokenizer: str | None = None  # None: the checkpoint's tokenizer, or the bundled one for named configs
    eval_split: str = "validation"
    holdout: int | None = None  # evaluate on this many records held out of each task's train split (jpeft.data.holdout)
    eval_instructions: tuple[str, ...] = ()  # LLM-Adapters files to evaluate on (accuracy and accuracy_generate)
    limit: int | None = None
    seed: int = 0
    quantize: str | None = None  # QLoRA: the frozen base in nf4 / fp4 / int8 (jpeft.quantize), None: as loaded
    mesh: str | None = None  # "data=2,fsdp=4,tp=1" (jpeft.sharding.make_mesh); None: data parallel over every device
    train: train.TrainConfig = dataclasses.field(default_factory=train.TrainConfig)


def load_model(name_or_path: str, dtype, param_dtype=None, seed: int = 0, quantize: str | None = None):
    """``(model, params, hf_config)`` of a real model (``smollm2-135m``, fetched once), a named
    configuration (random weights), a ``.gguf`` file, a Phi / Llama / Mistral / Qwen2 checkpoint
    directory or a hub id; its kernels quantized (:func:`jpeft.quantize`'s default targets)
    with ``quantize``."""
    if llama.reads_gguf(name_or_path):
        model, params = llama.from_pretrained(name_or_path, dtype=dtype, param_dtype=param_dtype, quantize=quantize)
        return model, params, llama.hf_config(name_or_path)
    if name_or_path in models.NAMED_CONFIGS:
        port, cfg = models.NAMED_CONFIGS[name_or_path], models.config(name_or_path)
        model, params = port.init(cfg, jax.random.key(seed), dtype=dtype, param_dtype=param_dtype)
        return model, (params if quantize is None else quantized.quantize(params, quantize)), cfg
    directory = layers.checkpoint_directory(name_or_path)
    port = models.family(directory)
    model, params = port.from_pretrained(directory, dtype=dtype, param_dtype=param_dtype, quantize=quantize)
    return model, params, port.load_config(directory)


def load_tokenizer(cfg: RunConfig):
    """The run's tokenizer: ``cfg.tokenizer``, else the model's own (a GGUF file's, a checkpoint's),
    else for a named configuration with random weights the bundled one; a missing pad token
    is the EOS token."""
    name = cfg.tokenizer or cfg.model
    if llama.reads_gguf(name):  # first: smollm2-135m is also the name of its shapes
        tok = llama.tokenizer(name)
    elif cfg.tokenizer is None and cfg.model in models.NAMED_CONFIGS:
        return data.default_tokenizer()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def task_file(cfg: RunConfig, task: str, split: str):
    """The local file of a task split: ``data_dir/{task}/{split}.*``, the bundled sample, or None (hub)."""
    if cfg.data_dir is None:
        path = data.sample_path(task, split)
        return path if path.exists() else None
    for ext in ("jsonl", "json", "jsonl.gz", "json.gz", "parquet"):
        path = os.path.join(cfg.data_dir, task, f"{split}.{ext}")
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no {split} file for {task} in {cfg.data_dir} (expected {task}/{split}.jsonl|json|parquet)")


def split_label(cfg: RunConfig) -> str:
    """The name the results give the evaluated split."""
    return f"train, {cfg.holdout} held out (seed {data.HOLDOUT_SEED})" if cfg.holdout else cfg.eval_split


def load_examples(cfg: RunConfig, task: str, split: str) -> list[data.Example]:
    """A task's ``train`` examples, or its evaluation examples (``split`` = ``cfg.eval_split``).
    With ``cfg.holdout`` both come from the train split: :func:`jpeft.data.holdout`'s records
    for evaluation, the rest (``cfg.limit`` of them) for training."""
    if not cfg.holdout:
        return data.load_task(task, split, path=task_file(cfg, task, split), limit=cfg.limit, template=cfg.template)
    every = data.load_task(task, "train", path=task_file(cfg, task, "train"), template=cfg.template)
    rest, held = data.holdout(every, cfg.holdout)
    return rest[:cfg.limit] if split == "train" else held


def training_pairs(cfg: RunConfig) -> list[tuple[str, str]]:
    if cfg.instructions:
        return data.load_instructions(cfg.instructions, limit=cfg.limit)
    return [pair for task in cfg.tasks for pair in data.training_pairs(load_examples(cfg, task, "train"))]


def tokenized_hparams(hparams: dict, tokenizer) -> dict:
    """``hparams`` with an ``init_text`` (prompt tuning's init text, PEFT's
    ``prompt_tuning_init_text``) replaced by its token ids ``init_text_ids`` under the run's
    tokenizer, as PEFT tokenizes it (no special tokens added)."""
    if "init_text" not in hparams:
        return dict(hparams)
    rest = {k: v for k, v in hparams.items() if k != "init_text"}
    if "init_text_ids" in rest:
        raise ValueError("give init_text or init_text_ids, not both")
    text = hparams["init_text"]
    if not isinstance(text, str) or not text:
        raise ValueError(f"init_text must be a non-empty string, got {text!r}")
    return {**rest, "init_text_ids": tuple(data.token_ids(tokenizer, [text])[0])}


def default_run_dir(cfg: RunConfig, root: str = "runs") -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(root, f"{stamp}-{cfg.method}-{'+'.join(cfg.tasks)}")


def eval_sets(cfg: RunConfig, tokenizer) -> dict[str, list[data.Example]]:
    """Every evaluation set of the run by result name (the tasks, then each instruction file's
    stem), read and checked against ``max_length`` now: a bad file or a choice that cannot fit
    fails before any training."""
    sets = {task: load_examples(cfg, task, cfg.eval_split) for task in cfg.tasks}
    for path in cfg.eval_instructions:
        name = pathlib.Path(path).name.split(".")[0]
        if name in sets:
            raise ValueError(f"two evaluation sets are named {name!r} (a task or another instruction file): rename {path}")
        sets[name] = data.load_instruction_examples(path)
    for examples in sets.values():
        next(data.prompt_batches(examples, tokenizer, batch_size=1, max_length=cfg.train.max_length))
    return sets


def evaluate_tasks(cfg: RunConfig, model, params, tokenizer, run_dir: str | None, sets=None, progress: bool = False,
                   **info) -> dict[str, dict]:
    """Accuracy on every evaluation set (:func:`eval_sets`, unless given), one forward per
    prompt (:func:`jpeft.eval.make_cached_score_fn`); for instruction files also LLM-Adapters'
    generation protocol (``accuracy_generate``). Writes ``run_dir/results/{name}.json``."""
    score_fn = evaluation.make_cached_score_fn(model)
    summary = {}
    for name, examples in (sets or eval_sets(cfg, tokenizer)).items():
        kw = dict(batch_size=cfg.train.batch_size, max_length=cfg.train.max_length, progress=progress)
        result = evaluation.evaluate(model, params, examples, tokenizer, score_fn=score_fn, **kw)
        keys = ["accuracy", "accuracy_norm", "n"]
        if name not in cfg.tasks:  # an LLM-Adapters file
            result |= evaluation.evaluate_generate(model, params, examples, tokenizer, **kw)
            keys.append("accuracy_generate")
        if run_dir and sharding.is_primary():
            evaluation.write_results(os.path.join(run_dir, "results", f"{name}.json"), name, result,
                                     split=split_label(cfg) if name in cfg.tasks else "all", model=cfg.model,
                                     template=cfg.template, **info)
        summary[name] = {k: result[k] for k in keys}
    return summary


def to_jsonable(cfg: RunConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def finetune(cfg: RunConfig, run_dir: str, *, max_steps=None, stop_at=None, checkpoint_every=100, log_every=10,
             progress=True, merged_out: str | None = None, peft_out: str | None = None, loaded: tuple | None = None) -> dict:
    """Adapt, train (resuming if ``run_dir`` has checkpoints), evaluate; returns the summary.
    On ``cfg.mesh`` (:mod:`jpeft.sharding`); with several processes every one calls this
    alike (the same ``run_dir``, on a filesystem they all see) and process 0 writes.
    ``merged_out``: also the merged model in Hugging Face format; ``peft_out``: also the
    adapter in HF PEFT's format (:mod:`jpeft.peft_format`; checked before training).
    ``loaded``: the ``(model, params, hf_config, tokenizer)`` of :func:`load_model` and
    :func:`load_tokenizer` for ``cfg``, when the caller has them already."""
    mesh = sharding.make_mesh(cfg.mesh)
    if peft_out and jax.process_count() > 1:
        raise ValueError("peft_out is written by one process: run `jpeft export` on the run's adapter afterwards")
    dtype = jnp.dtype(cfg.train.compute_dtype)
    # a base the mesh splits is loaded and adapted in host memory, then placed in slices:
    # no device ever holds it whole
    splits_base = any(mesh.shape.get(a, 1) > 1 for a in ("fsdp", "tp"))
    with jax.default_device(jax.local_devices(backend="cpu")[0] if splits_base else None):
        if loaded is None:
            model, params, hf_config = load_model(cfg.model, dtype, dtype, cfg.seed, cfg.quantize)
            tokenizer = load_tokenizer(cfg)
        else:
            model, params, hf_config, tokenizer = loaded
        model = model.clone(remat=cfg.train.remat)
        adapted = core.apply(params, cfg.method, key=jax.random.key(cfg.seed),
                             targets=list(cfg.targets) if cfg.targets else None,
                             also_train=list(cfg.also_train) if cfg.also_train else None, model=model,
                             **tokenized_hparams(cfg.hparams, tokenizer))
    if peft_out:
        peft_format.check(adapted, base=params)
    encoded = data.encode_pairs(training_pairs(cfg), tokenizer, cfg.train.max_length)
    sets = eval_sets(cfg, tokenizer) if stop_at is None else None
    # only now, with the model, the method and the data validated: a bad run leaves no directory
    os.makedirs(run_dir, exist_ok=True)
    if sharding.is_primary():
        with open(os.path.join(run_dir, "run.json"), "w") as f:
            json.dump(to_jsonable(cfg), f, indent=2)
    trained, records = train.fit(model, adapted, encoded, cfg.train, run_dir, max_steps=max_steps, stop_at=stop_at,
                                 checkpoint_every=checkpoint_every, log_every=log_every, progress=progress, mesh=mesh)
    summary = {"run_dir": run_dir, "trainable": core.count_params(adapted)["trainable"],
               "log": records, "final_loss": records[-1]["loss"] if records else None}
    # every export before evaluation (train.fit has written the adapter): a failed
    # evaluation loses nothing that was trained
    if merged_out:
        models.MODEL_TYPES[hf_config.model_type].save_pretrained(core.materialize(trained), hf_config, merged_out)
    if peft_out:
        peft_format.save(trained, peft_out, base_model_name_or_path=cfg.model, base=params)
    if stop_at is None:
        summary["results"] = evaluate_tasks(cfg, model, trained, tokenizer, run_dir, sets, progress, method=cfg.method)
    return summary


def zero_shot(cfg: RunConfig, run_dir: str | None = None, adapter: str | None = None,
              peft_adapter: str | None = None) -> dict[str, dict]:
    """Evaluate the base model (or base + a saved jpeft adapter, or + an adapter in HF
    PEFT's format) on ``cfg.tasks``."""
    if adapter and peft_adapter:
        raise ValueError("give a jpeft adapter or a PEFT adapter, not both")
    dtype = jnp.dtype(cfg.train.compute_dtype)
    model, params, _ = load_model(cfg.model, dtype, dtype, cfg.seed, cfg.quantize)
    if adapter:
        params = checkpoint.load_adapter(adapter, params, model=model)
    if peft_adapter:
        params = peft_format.load(params, peft_adapter)
    return evaluate_tasks(cfg, model, params, load_tokenizer(cfg), run_dir, adapter=adapter or peft_adapter)


def parse_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    out = tuple(data.TASKS) if list(tasks) == ["all"] else tuple(tasks)
    unknown = [t for t in out if t not in data.TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; tasks: {', '.join(data.TASKS)} or 'all'")
    return out
