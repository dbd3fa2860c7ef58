"""HF PEFT's side of the benchmark (torch): the same model, layers and hyper-parameters as
jpeft's run, eager or under ``torch.compile``.
"""

from __future__ import annotations

import os
import platform
import time

from jpeft.bench.config import BenchConfig, model_flops_per_step, peak_flops
from jpeft.bench.timing import PROFILE_STEPS, timed_steps, timing_fields, trace_path


#: Methods HF PEFT also has; its HRA is also timed as the Householder baseline of shoft/rhoft.
PEFT_METHODS = ("lora", "dora", "lokr", "oft", "boft", "hra", "loha", "ia3", "vera", "adalora", "prompt_tuning",
                "p_tuning", "prefix_tuning")

#: jpeft's LoRA init -> PEFT's ``init_lora_weights``
PEFT_LORA_INIT = {"gaussian": "gaussian", "kaiming": True, "pissa": "pissa", "olora": "olora"}


def peft_config(method: str, hparams: dict, target_modules: list[str]):
    """HF PEFT's config for the same hyper-parameters as jpeft's validated config of ``method``."""
    import peft

    from jpeft.methods.registry import make_config

    c = make_config(method, **hparams)
    if method in ("lora", "dora"):
        return peft.LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, use_dora=method == "dora",
                               init_lora_weights=PEFT_LORA_INIT[c.init], use_rslora=c.rslora, target_modules=target_modules)
    if method == "lokr":
        return peft.LoKrConfig(r=c.r, alpha=c.alpha, decompose_factor=c.factor, target_modules=target_modules)
    if method == "oft":  # PEFT rotates inputs (jpeft's side="in"); same cost either side
        return peft.OFTConfig(r=0, oft_block_size=c.block_size, coft=False, use_cayley_neumann=c.neumann_terms is not None,
                              num_cayley_neumann_terms=c.neumann_terms or 5, target_modules=target_modules)
    if method == "hra":
        return peft.HRAConfig(r=c.r, target_modules=target_modules)
    if method == "boft":
        return peft.BOFTConfig(boft_block_size=c.block_size, boft_n_butterfly_factor=c.n_butterfly, target_modules=target_modules)
    if method == "loha":
        return peft.LoHaConfig(r=c.r, alpha=c.alpha, target_modules=target_modules)
    if method == "ia3":
        return peft.IA3Config(target_modules=target_modules, feedforward_modules=target_modules if c.feedforward else [])
    if method == "vera":
        return peft.VeraConfig(r=c.r, d_initial=c.d_init, vera_dropout=c.dropout, target_modules=target_modules)
    if method == "adalora":  # the step alone: the rank budget schedule runs between steps
        return peft.AdaLoraConfig(init_r=c.r, target_r=c.target_r, lora_alpha=c.alpha, lora_dropout=c.dropout,
                                  orth_reg_weight=c.orth_reg_weight, total_step=c.total_step or 1000, target_modules=target_modules)
    prompt = dict(task_type="CAUSAL_LM", num_virtual_tokens=getattr(c, "num_virtual_tokens", None))
    if method == "prompt_tuning":  # random init: a text init needs PEFT a tokenizer, and costs the same
        return peft.PromptTuningConfig(**prompt)
    if method == "p_tuning":
        return peft.PromptEncoderConfig(**prompt, encoder_reparameterization_type=c.encoder.upper(),
                                        encoder_hidden_size=c.encoder_hidden_size, encoder_num_layers=c.encoder_num_layers)
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(**prompt, prefix_projection=c.projection, encoder_hidden_size=c.encoder_hidden_size)
    raise ValueError(f"HF PEFT has no counterpart of {method!r}; it has {PEFT_METHODS}")


def hf_target_modules(cfg: BenchConfig) -> list[str]:
    """The transformers module names of the kernels jpeft's ``cfg.targets`` select, so
    PEFT adapts exactly the same layers."""
    import jpeft
    from jpeft import models
    from jpeft.models import layers

    shapes = layers.param_shapes(models.make_model(models.config(cfg.model)))
    paths = jpeft.match_targets(shapes, list(cfg.targets) if cfg.targets else None)
    return [layers.hf_name(tuple(p.split("/")))[0].removesuffix(".weight") for p in paths]


def run_peft(cfg: BenchConfig, method: str, compiled: bool) -> dict:
    """Time HF PEFT (torch) on the same configuration and hyper-parameters (adapter
    dropout included): fp32 master weights, bf16 autocast, AdamW."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from jpeft import models

    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = f"{device}:{torch.cuda.get_device_name() if device == 'cuda' else platform.processor()}"
    torch.manual_seed(0)
    config = models.config(cfg.model)
    model = AutoModelForCausalLM.from_config(config).to(device)
    model = peft.get_peft_model(model, peft_config(method, cfg.hparams.get(method, {}), hf_target_modules(cfg)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(0, config.vocab_size, (cfg.batch, cfg.seq_len), device=device)
    forward = torch.compile(model) if compiled else model
    amp = torch.autocast(device_type=device, dtype=getattr(torch, cfg.compute_dtype))

    def one():
        with amp:
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    one()  # the first step compiles under torch.compile
    compile_s = time.perf_counter() - start
    times = timed_steps(one, cfg.warmup, cfg.steps)
    impl = "peft-compiled" if compiled else "peft-eager"
    if cfg.profile_dir:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(PROFILE_STEPS):
                one()
        os.makedirs(cfg.profile_dir, exist_ok=True)
        prof.export_chrome_trace(trace_path(cfg, impl, method))
    tokens = cfg.batch * cfg.seq_len
    flops = model_flops_per_step(config, tokens, cfg.seq_len)
    return {
        "impl": impl,
        "method": method,
        "device": device_name,
        "model_tflop_per_step": flops / 1e12,
        **timing_fields(times, tokens, flops, peak_flops(device_name, cfg.peak_tflops)),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "compile_s": compile_s,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
