"""What a benchmark runs (:class:`BenchConfig`, validated before any worker starts) and the
cost model its figures are read against: the model FLOP of a step and the device's bf16 peak.
"""

from __future__ import annotations

import dataclasses
import math


#: bf16 peak FLOP/s by device kind (substring of ``device_kind`` or torch's device name).
#: H100/H200: the ≈790 TFLOP/s the targets are stated against (experiments/PERF.md; the
#: datasheet's dense figure is 989); others: datasheet dense figures. ``peak_tflops`` overrides.
PEAK_FLOPS = {"H100": 790e12, "H200": 790e12, "A100": 312e12, "L4": 121e12, "RTX 3090": 71e12}

METHOD_ORDER = ("lora", "dora", "lokr", "oft", "boft", "shoft", "rhoft")

#: The Householder methods; with ``--peft`` they are compared with PEFT's HRA.
HOUSEHOLDER = ("shoft", "rhoft")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    model: str = "tiny"  # a name of jpeft.models.NAMED_CONFIGS (a port), or linen:SIZE / nnx:SIZE
    batch: int = 16
    seq_len: int = 256
    methods: tuple[str, ...] = METHOD_ORDER
    targets: tuple[str, ...] | None = None  # regexes; None: Q/K/V
    compute_dtype: str = "bfloat16"
    param_dtype: str = "bfloat16"  # frozen base weights; trainables are always float32
    warmup: int = 3
    steps: int = 10
    hparams: dict = dataclasses.field(default_factory=dict)  # {method: {name: value}}
    compile_only: bool = False  # compile at abstract shapes: XLA's FLOP and memory, no timing
    peak_tflops: float | None = None  # overrides PEAK_FLOPS for MFU
    remat: str = "none"  # jpeft.models.layers.REMAT_POLICIES
    profile_dir: str | None = None  # if set, PROFILE_STEPS more steps per run are traced there (trace_path)
    quantize: str | None = None  # also each method over the base quantized so (QLoRA: nf4, fp4, int8), impl "jpeft-nf4"
    mesh: str | None = None  # "data=2,fsdp=4" (jpeft.sharding): the step jitted for train.step_shardings on that mesh

    def __post_init__(self):
        for name in ("batch", "seq_len", "steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        if not self.methods:
            raise ValueError("methods must name at least one method")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops must be positive, got {self.peak_tflops!r}")
        if self.profile_dir and self.compile_only:
            raise ValueError("profile_dir traces timed steps and cannot be combined with compile_only")
        if self.mesh is not None:
            from jpeft import sharding

            sizes = sharding.parse_mesh(self.mesh)  # names the bad part
            rows = sharding.batch_divisor(sizes)
            if self.batch % rows:
                raise ValueError(f"batch={self.batch} does not split over the {rows} data-parallel positions "
                                 f"(data x fsdp) of the mesh {self.mesh}")
            if is_flax_model(self.model) and sizes.get("tp", 1) > 1:
                raise ValueError(f"a tp axis splits layers by the ports' names (jpeft.sharding.TP_RULES), which "
                                 f"{self.model!r}'s stock flax modules do not follow; use data and fsdp axes")
        from jpeft import models, train
        from jpeft.methods.registry import get_method, make_config
        from jpeft.models import layers, phi

        layers.check_remat(self.remat)
        flax_models = [f"{arch}:{size}" for arch in ("linen", "nnx") for size in phi.NAMED_CONFIGS]
        if self.model not in models.NAMED_CONFIGS and self.model not in flax_models:
            raise ValueError(f"model must be one of {sorted(models.NAMED_CONFIGS)} (jpeft's ports) or {flax_models} "
                             f"(a decoder of stock flax modules at that size), got {self.model!r}")
        if self.quantize is not None:
            from jpeft import quant

            if self.quantize not in quant.KINDS:
                raise ValueError(f"quantize must be one of {quant.KINDS}, got {self.quantize!r}")
            if is_flax_model(self.model):
                raise ValueError(f"quantize compares jpeft's ports' steps, not {self.model!r}'s")
        added = [m for m in self.methods if get_method(m).scope == "model"]
        if is_flax_model(self.model) and added:
            raise ValueError(f"{added} add computation at a model's hook points, which jpeft's ports have and "
                             f"{self.model!r} (stock flax modules) does not; bench them on a port")
        if is_flax_model(self.model) and self.remat != "none":
            raise ValueError(f"remat applies to jpeft's ports only, not to {self.model!r}")
        if is_flax_model(self.model) and self.targets and "lora" in self.methods:
            qwix_module_path(self.targets)  # the qwix LoRA route must adapt the same layers
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in train.COMPUTE_DTYPES:
                raise ValueError(f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")
        for method in (*self.methods, "hra"):
            make_config(method, **self.hparams.get(method, {}))  # names the bad method or value
        extra = set(self.hparams) - set(self.methods) - {"hra"}  # hra: the PEFT baseline's r
        if extra:
            raise ValueError(f"hyper-parameters given for {sorted(extra)}, which are not among the methods {list(self.methods)}")


#: Named configurations without a checkpoint, there for shapes-only benches (``compile_only``).
SHAPES_ONLY_MODELS = ("phi-7b",)


def mesh_devices(mesh: str) -> int:
    """How many devices ``mesh`` (``"data=2,fsdp=4"``) spans: the product of its sizes."""
    from jpeft import sharding

    return math.prod(sharding.parse_mesh(mesh).values())


def is_flax_model(model: str) -> bool:
    """``linen:SIZE`` / ``nnx:SIZE``: the decoder of stock flax modules at a Phi size."""
    return model.split(":")[0] in ("linen", "nnx") and ":" in model


def qwix_module_path(targets: list[str] | tuple[str, ...]) -> str:
    """qwix's ``module_path`` regex for jpeft kernel ``targets``: qwix matches the path of
    the module owning a kernel, so each target must end in ``/kernel`` (refused otherwise,
    as qwix's LoRA would then adapt other layers than jpeft's)."""
    bad = [t for t in targets if not t.endswith("/kernel")]
    if bad:
        raise ValueError(f"the qwix route needs targets ending in '/kernel' (qwix selects modules, not parameters), got {bad}")
    return "|".join(f"(?:{t.removesuffix('/kernel')})" for t in targets)


def model_flops_per_step(config, tokens: int, seq_len: int) -> float:
    """``4·N·T`` for the matmul parameters (embedding lookup excluded) + causal attention."""
    h, layers, inter, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    n_matmul = layers * (4 * h * h + 2 * h * inter) + h * vocab
    attention = 8.0 * layers * tokens * seq_len * h / 2  # causal: half of QKᵀ and PV
    return 4.0 * n_matmul * tokens + attention


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """The device's bf16 peak FLOP/s for MFU (``None``, and no MFU, for an unknown device)."""
    if override_tflops:
        return override_tflops * 1e12
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)
