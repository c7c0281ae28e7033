"""Warnings an experienced engineer would give about a Workload on a GPU."""

from __future__ import annotations

from app.catalog import Catalog, GPUProfile
from app.estimator.architecture import Kind
from app.estimator.model import ResolvedModel
from app.estimator.setup import SIXTEEN_BIT, resolve_weight_dtype
from app.estimator.states import PAGED_OPTIMIZERS
from app.units import DType, format_gib
from app.workload import AttnImplementation, Task, Workload


def collect_warnings(
    workload: Workload, gpu: GPUProfile, model: ResolvedModel, catalog: Catalog, peak: int, usable: int, verdict: str
) -> list[str]:
    """Human-readable warnings, most important first."""
    warnings: list[str] = []
    training = workload.training
    is_training = workload.task is Task.train
    if is_training and training.bf16 is None and not training.fp16 and not gpu.bf16:
        warnings.append(
            f"{gpu.name} has no bf16: trl's SFTConfig defaults to bf16=True, which fails here; estimated with fp16=True (set it)"
        )
    if is_training and training.bf16 and not gpu.bf16:
        warnings.append(f"bf16 requested but the {gpu.name} does not support bf16 (compute capability {gpu.compute_capability}); use fp16")
    if _asks_bf16(workload) and not gpu.bf16:
        warnings.append(f"bnb_4bit_compute_dtype bfloat16 on the {gpu.name}, which has no bf16: use float16")
    if training.tf32 and not gpu.tf32:
        warnings.append(f"tf32 requested but the {gpu.name} has no TF32 tensor cores (Ampere or newer)")
    if training.attn_implementation is AttnImplementation.flash_attention_2 and not gpu.flash_attention_2:
        warnings.append(f"FlashAttention-2 needs an Ampere or newer GPU; the {gpu.name} cannot run it: use sdpa")
    if training.optim in PAGED_OPTIMIZERS and verdict != "fits":
        warnings.append("paged optimizer states live in unified memory and spill to CPU RAM when the GPU is full (slower steps)")
    if model.arch is None:
        warnings.append("only model states are estimated for a bare parameter count: give model.id or model.config for activations")
    if is_training and model.arch is not None:
        warnings += _training_warnings(workload, model)
    if model.arch is not None and training.attn_implementation is not AttnImplementation.eager:
        arch = model.arch
        if training.attn_implementation is AttnImplementation.sdpa and not arch.supports_sdpa:
            warnings.append(f"transformers has no SDPA attention for {arch.family}: it runs eager attention, which keeps the s x s scores")
        if training.attn_implementation.value.startswith("flash") and not arch.supports_flash_attention:
            warnings.append(f"transformers has no FlashAttention for {arch.family}: estimated with the attention it falls back to")
    if workload.quantization is not None and gpu.vendor != "nvidia":
        warnings.append(f"bitsandbytes quantization on {gpu.vendor.upper()} needs its ROCm backend (bitsandbytes >= 0.45 multi-backend)")
    if verdict == "does_not_fit" and peak > max(g.memory_bytes for g in catalog.gpus.values()) * workload.hardware.num_gpus:
        warnings.append(f"needs {format_gib(peak)} per GPU: more than any GPU in the catalog offers; shard, quantize or use LoRA")
    return warnings


def _asks_bf16(workload: Workload) -> bool:
    quant = workload.quantization
    return bool(quant and quant.load_in_4bit and quant.bnb_4bit_compute_dtype == DType.bfloat16)


def _training_warnings(workload: Workload, model: ResolvedModel) -> list[str]:
    warnings: list[str] = []
    arch = model.arch
    assert arch is not None
    weight_dtype = resolve_weight_dtype(workload, arch)
    full = workload.lora is None and workload.quantization is None
    if full and weight_dtype == DType.float16 and workload.training.fp16:
        warnings.append("full fine-tuning with float16 weights and fp16=True fails ('Attempting to unscale FP16 gradients'): load in float32")
    if arch.kind is Kind.encoder_decoder and workload.training.fp16:
        warnings.append("T5-family models overflow in fp16 (known NaN losses); prefer bf16 or fp32")
    if workload.quantization is not None and not arch.bnb_quantizes_linears and workload.quantization.quant_method == "bitsandbytes":
        warnings.append(f"transformers 5 quantizes only exact nn.Linear modules: {arch.family}'s own linear class stays "
                        "unquantized (and fp32 after prepare_model_for_kbit_training); 4-bit/8-bit loading saves nothing here")
    if arch.num_experts and workload.quantization is not None:
        warnings.append(
            "transformers 5 stores MoE experts as fused tensors, not nn.Linear: bitsandbytes leaves them unquantized"
        )
    if weight_dtype in SIXTEEN_BIT and workload.training.optim.value.startswith("adamw_torch") and full:
        warnings.append("pure 16-bit AdamW (states in the weights' dtype) loses precision; load in float32 with bf16=True for mixed precision")
    lora = workload.lora
    if lora is not None and lora.use_dora and lora.lora_dropout > 0:
        # peft/tuners/lora/variants.py DoraLinearVariant.forward: base_result only without dropout
        warnings.append("DoRA with lora_dropout > 0 computes every adapted layer's base output a second time and keeps a copy of its "
                        "weight for backward (PEFT's dora.py): lora_dropout=0 reuses the base output and saves that memory")
    return warnings
