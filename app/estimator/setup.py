"""The resolved setup: what a Workload means once defaults, the model and the GPU are known.

Every later formula reads a ``Setup`` rather than re-deciding dtypes, trainable modules or
precision modes, so those decisions are made once, here, each with its source.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from app.catalog import GPUProfile
from app.estimator.architecture import Architecture
from app.estimator.params import Module, ModuleKind
from app.units import DType, parse_dtype
from app.workload import AttnImplementation, LoRA, Strategy, Task, Workload

SIXTEEN_BIT = (DType.float16, DType.bfloat16)


class Precision(StrEnum):
    """How weights and compute relate.

    fp32: everything in fp32. amp: fp32 weights, 16-bit compute under ``torch.autocast``
    (TrainingArguments bf16/fp16 with fp32 weights). pure16: weights, gradients and torch optimizer
    states all in the 16-bit load dtype. quantized: frozen int8/int4 base, 16/32-bit compute.
    """

    fp32 = "fp32"
    amp = "amp"
    pure16 = "pure16"
    quantized = "quantized"


# PEFT's default LoRA targets when target_modules is None
# (peft/utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, peft 0.21).
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "qwen2_moe": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "olmo": ["q_proj", "v_proj"],
    "olmo2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "phi": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "bert": ["query", "value"],
    "falcon": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
}


class SetupError(ValueError):
    """A Workload that cannot run as asked (e.g. LoRA targets that match no module)."""


class Setup(BaseModel):
    """A Workload resolved against its architecture and GPU."""

    model_config = ConfigDict(frozen=True)

    task: Task
    precision: Precision
    weight_dtype: DType
    compute_dtype: DType
    residual_dtype: DType  # dtype of the hidden states between blocks
    quant_bits: int | None  # 4 or 8 for a quantized base, None otherwise
    kbit_prepared: bool  # prepare_model_for_kbit_training casts the rest to fp32
    lora_targets: tuple[str, ...]  # module names carrying adapters
    full_trainable: bool  # full fine-tuning: every (unfrozen) parameter trains
    trainable_layer_fraction: float  # 1 - frozen_layers / num_layers
    data_parallel: int
    tensor_parallel: int
    strategy: Strategy
    attention: AttnImplementation  # the kernel that really runs (see resolve_attention)
    # Trainer with bf16/fp16 runs the forward under torch.autocast and converts the outputs to fp32,
    # whatever the weights' dtype (accelerate/accelerator.py prepare_model: autocast_context and
    # convert_outputs_to_fp32). None: no autocast (fp32 training, or inference).
    autocast: DType | None
    keep_in_fp32_modules: tuple[str, ...] = ()
    bnb_quantizes_linears: bool = True


def matches_target(module_name: str, target: str) -> bool:
    """PEFT's rule: a target matches a module whose dotted name equals it or ends with ``.target``."""
    return module_name == target or module_name.endswith("." + target) or target.endswith("." + module_name)


def resolve_lora_targets(lora: LoRA, arch: Architecture, modules: list[Module]) -> tuple[str, ...]:
    """Module names that get adapters. ``all-linear``: every linear layer but the output head
    (peft/tuners/tuners_utils.py, _maybe_include_all_linear_layers). A rank above the hidden size is
    refused: B·A of a module has rank at most min(in, out) <= hidden size, so more adds only weights."""
    if lora.r > arch.hidden_size:
        raise SetupError(f"lora.r is {lora.r}, larger than the hidden size {arch.hidden_size} of this {arch.family} model; "
                         f"an adapter's update has rank at most the hidden size: choose r <= {arch.hidden_size}")
    linear = [m.name for m in modules if m.kind is ModuleKind.linear and m.per_layer]
    if lora.target_modules == "all-linear":
        return tuple(linear)
    targets = lora.target_modules if lora.target_modules is not None else DEFAULT_LORA_TARGETS.get(arch.family, [])
    chosen = tuple(name for name in linear if any(matches_target(name, t) for t in targets))
    if not chosen:
        known = ", ".join(sorted(set(linear)))
        raise SetupError(f"lora.target_modules {targets} match no linear module of {arch.family}; its linear modules: {known}")
    return chosen


def lora_casts_input(setup: Setup) -> bool:
    """Whether PEFT's LoRA layers cast their input to the adapters' dtype (lora/layer.py
    ``_cast_input_dtype``); bitsandbytes LoRA layers under autocast keep it (peft/tuners/lora/bnb.py)."""
    return not (setup.precision is Precision.quantized and setup.autocast is not None)


def resolve_weight_dtype(workload: Workload, arch: Architecture | None) -> DType:
    """The load dtype. None means transformers 5's ``dtype="auto"``: the config's dtype, else fp32
    (transformers/modeling_utils.py, _get_dtype)."""
    if workload.model.dtype is not None:
        return workload.model.dtype
    if arch is not None and arch.config_dtype:
        try:
            return parse_dtype(arch.config_dtype)
        except ValueError:
            return DType.float32
    return DType.float32


def resolve_half_precision(workload: Workload, gpu: GPUProfile) -> DType | None:
    """The 16-bit compute dtype that TrainingArguments' bf16/fp16 select, if any.

    ``bf16=None`` follows trl's SFTConfig (bf16 defaults to True unless fp16 is set) on GPUs with
    bf16; on GPUs without it (T4, V100, P100) the run would fail, so the estimate uses fp16, as the
    planner recommends, and says so in a warning.
    """
    training = workload.training
    if training.fp16:
        return DType.float16
    if training.bf16 is True:
        return DType.bfloat16
    if training.bf16 is False:
        return None
    return DType.bfloat16 if gpu.bf16 else DType.float16


def resolve_setup(workload: Workload, arch: Architecture | None, modules: list[Module], gpu: GPUProfile) -> Setup:
    """Decide precision, dtypes, trainable modules and parallelism for one Workload (``arch`` is
    None for a bare parameter count)."""
    weight_dtype = resolve_weight_dtype(workload, arch)
    quant = workload.quantization
    quant_bits = quant.weight_bits if quant is not None else None
    training = workload.task is Task.train
    kbit_prepared = bool(quant is not None and training and quant.prepare_model_for_kbit_training is not False)
    half = resolve_half_precision(workload, gpu) if training else None
    if quant is not None:
        precision = Precision.quantized
        compute = quant.bnb_4bit_compute_dtype if quant.load_in_4bit else (half or _sixteen_or_fp32(weight_dtype))
        if quant.load_in_8bit or quant.quant_method != "bitsandbytes":
            compute = half or (weight_dtype if weight_dtype in SIXTEEN_BIT else DType.float16)
        residual = DType.float32 if kbit_prepared else (weight_dtype if weight_dtype in SIXTEEN_BIT else compute)
    elif weight_dtype == DType.float32:
        precision = Precision.amp if half else Precision.fp32
        compute = half or DType.float32
        residual = DType.float32
    else:
        precision = Precision.pure16
        compute = weight_dtype
        residual = weight_dtype
    if workload.lora is not None and arch is None:
        raise SetupError("LoRA needs the model's architecture: give model.id or model.config, not num_parameters")
    lora_targets = resolve_lora_targets(workload.lora, arch, modules) if workload.lora is not None and arch else ()
    layers = arch.total_layers if arch else 1
    frozen = min(workload.training.frozen_layers, layers) if arch else 0
    tp = workload.distributed.tensor_parallel_size
    return Setup(
        task=workload.task,
        precision=precision,
        weight_dtype=weight_dtype,
        compute_dtype=compute,
        residual_dtype=residual,
        quant_bits=quant_bits,
        kbit_prepared=kbit_prepared,
        lora_targets=lora_targets,
        full_trainable=training and workload.lora is None and workload.peft is None and quant is None,
        trainable_layer_fraction=1 - frozen / layers,
        data_parallel=workload.hardware.num_gpus // tp,
        tensor_parallel=tp,
        strategy=workload.strategy,
        attention=resolve_attention(workload.training.attn_implementation, arch),
        autocast=half,
        keep_in_fp32_modules=arch.keep_in_fp32_modules if arch else (),
        bnb_quantizes_linears=arch.bnb_quantizes_linears if arch else True,
    )


def resolve_attention(requested: AttnImplementation, arch: Architecture | None) -> AttnImplementation:
    """The attention that runs: transformers falls back to eager for a model without SDPA (and
    refuses flash_attention_2 without support, estimated as eager with a warning)."""
    if arch is None:
        return requested
    if requested is AttnImplementation.sdpa and not arch.supports_sdpa:
        return AttnImplementation.eager
    if requested.value.startswith("flash") and not arch.supports_flash_attention:
        return AttnImplementation.sdpa if arch.supports_sdpa else AttnImplementation.eager
    return requested


def _sixteen_or_fp32(dtype: DType) -> DType:
    return dtype if dtype in SIXTEEN_BIT else DType.float32
