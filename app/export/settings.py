"""From a Workload to the keyword arguments of the Hugging Face objects a training run builds.

One ``ExportSettings`` feeds train.py, config.yaml and the multi-GPU configs, so they cannot
disagree. Names are those of the libraries vramplan is calibrated with (transformers 5.24:
``from_pretrained(dtype=...)``, ``activation_checkpointing``; trl 1.16 SFTConfig: ``max_length``; peft
0.21; bitsandbytes 0.50). Values that train.py must write as Python expressions (``torch.float16``,
``TaskType.CAUSAL_LM``) are ``Code`` strings.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from app.catalog import Catalog, GPUProfile
from app.configcheck import NAME_OR_PATH
from app.estimator.estimate import Estimate, estimate
from app.estimator.model import ResolvedModel, resolve_model
from app.estimator.setup import resolve_half_precision, resolve_weight_dtype
from app.planner.rules import ModelClasses, bitsandbytes_note, correct_for_hardware, model_classes, model_notes
from app.units import DType
from app.workload import LossImplementation, PeftType, Strategy, Task, Workload

LORA_LEARNING_RATE = 2e-4  # QLoRA paper (arXiv:2305.14314) appendix, 7B-13B models
FULL_LEARNING_RATE = 2e-5  # trl SFTConfig's default
DATASETS = {  # (default dataset, its columns) per model kind
    "decoder": ("timdettmers/openassistant-guanaco", {"text": "text"}),
    "encoder_decoder": ("knkarthick/samsum", {"source": "dialogue", "target": "summary"}),
    "encoder": ("stanfordnlp/imdb", {"text": "text", "label": "label"}),
}
PEFT_CLASSES = {PeftType.IA3: "IA3Config", PeftType.PROMPT_TUNING: "PromptTuningConfig", PeftType.P_TUNING: "PromptEncoderConfig",
                PeftType.PREFIX_TUNING: "PrefixTuningConfig", PeftType.LN_TUNING: "LNTuningConfig"}
BITSANDBYTES_OPTIMIZER_MARKERS = ("8bit", "bnb", "paged_", "_32bit")


class Code(str):
    """A Python expression, written into train.py as is."""

    def __repr__(self) -> str:
        return str(self)


def torch_dtype(dtype: DType) -> Code:
    return Code(f"torch.{dtype.value}")


class ExportSettings(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    workload: Workload  # as corrected for the GPU
    estimate: Estimate
    gpu: GPUProfile
    classes: ModelClasses
    model_id: str | None
    corrections: list[str]
    requirements: list[str]  # pip packages beyond torch/transformers/peft/trl/bitsandbytes/datasets
    model_kwargs: dict[str, Any]  # from_pretrained
    quantization: dict[str, Any] | None  # BitsAndBytesConfig
    prepare_kbit: bool
    peft_class: str | None  # LoraConfig, IA3Config, ...
    peft_kwargs: dict[str, Any] | None
    adapter_dtype: DType | None  # trainable parameters are cast to this once the trainer is built
    training: dict[str, Any]  # SFTConfig / Seq2SeqTrainingArguments / TrainingArguments
    frozen_layers: int
    max_length: int
    max_target_length: int
    dataset: str
    columns: dict[str, str]
    deepspeed: dict[str, Any] | None
    fsdp: dict[str, Any] | None
    accelerate: dict[str, Any] | None

    @property
    def quantized(self) -> bool:
        return self.quantization is not None


def export_settings(workload: Workload, catalog: Catalog) -> ExportSettings:
    """Everything the exported files say, derived once; ValueError when it cannot be exported."""
    if workload.task is not Task.train:
        raise ValueError("export writes a training script: the workload's task must be train")
    if workload.model.num_parameters is not None:
        raise ValueError("export needs the model's architecture: give model.id or model.config, not num_parameters")
    gpu = catalog.gpu(workload.hardware.gpu)
    model = resolve_model(workload.model, catalog)
    corrected, corrections = correct_for_hardware(workload, gpu, model.arch)
    corrected, loss_notes = _exportable_loss(corrected)
    classes = model_classes(model.arch)
    result = estimate(corrected, catalog)
    notes = corrections + loss_notes + model_notes(model.name, model.arch) + _library_notes(corrected, gpu, classes)
    dataset, columns = DATASETS[classes.kind]
    training = corrected.training
    return ExportSettings(
        workload=corrected, estimate=result, gpu=gpu, classes=classes,
        model_id=workload.model.id or _config_name(workload), corrections=notes,
        requirements=_requirements(corrected, gpu),
        model_kwargs=_model_kwargs(corrected, model),
        quantization=_quantization_kwargs(corrected),
        prepare_kbit=_prepare_kbit(corrected),
        peft_class=_peft_class(corrected),
        peft_kwargs=_peft_kwargs(corrected, classes),
        adapter_dtype=corrected.lora.adapter_dtype if corrected.lora is not None else (DType.float32 if corrected.peft else None),
        training=_training_kwargs(corrected, gpu, classes),
        frozen_layers=training.frozen_layers if corrected.lora is None and corrected.peft is None else 0,
        max_length=training.max_seq_length,
        max_target_length=training.max_target_length or training.max_seq_length,
        dataset=dataset, columns=columns,
        deepspeed=_deepspeed(corrected), fsdp=_fsdp(corrected), accelerate=_accelerate(corrected, gpu),
    )


def _config_name(workload: Workload) -> str | None:
    """A pasted config's ``_name_or_path``, only when it cannot break out of the script's strings and
    docstring (``check_config`` refuses the rest at the edge; this holds for library callers too)."""
    name = (workload.model.config or {}).get("_name_or_path")
    return name if isinstance(name, str) and NAME_OR_PATH.fullmatch(name) else None


def _exportable_loss(workload: Workload) -> tuple[Workload, list[str]]:
    """transformers' Trainer has a switch for Liger's fused loss (use_liger_kernel) but none for a
    chunked loss: export the standard loss, and say so."""
    if workload.training.loss_implementation is not LossImplementation.chunked_cross_entropy:
        return workload, []
    training = workload.training.model_copy(update={"loss_implementation": LossImplementation.cross_entropy})
    note = ("loss_implementation cross_entropy instead of chunked_cross_entropy: transformers' Trainer has no switch for a "
            "chunked loss (use Liger's fused loss, fused_linear_cross_entropy, to keep logits out of memory)")
    return workload.model_copy(update={"training": training}), [note]


def _library_notes(workload: Workload, gpu: GPUProfile, classes: ModelClasses) -> list[str]:
    notes = []
    lora = workload.lora
    if workload.quantization is not None and classes.trainer == "SFTTrainer" and lora is not None and lora.adapter_dtype != DType.bfloat16:
        notes.append(f"trl 1.16's SFTTrainer casts the adapters of a quantized model to bfloat16 (sft_trainer.py); the script "
                     f"casts them back to {lora.adapter_dtype.value}, as planned")
    if workload.quantization is not None and workload.quantization.quant_method != "bitsandbytes":
        notes.append(f"load a {workload.quantization.quant_method.upper()} checkpoint: its quantization_config comes with it "
                     "(pip install gptqmodel or autoawq)")
    if workload.quantization is not None or uses_bitsandbytes_optimizer(workload.training.optim.value):
        note = bitsandbytes_note(gpu)
        if note:
            notes.append(note)
    return notes


def _requirements(workload: Workload, gpu: GPUProfile) -> list[str]:
    needs = []
    if workload.training.loss_implementation is LossImplementation.fused_linear_cross_entropy:
        needs.append("liger-kernel")
    if workload.training.attn_implementation.value.startswith("flash_attention"):
        needs.append("flash-attn")
    if workload.strategy in (Strategy.zero1, Strategy.zero2, Strategy.zero3):
        needs.append("deepspeed")
    return needs


def _model_kwargs(workload: Workload, model: ResolvedModel) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": torch_dtype(resolve_weight_dtype(workload, model.arch)),
                              "attn_implementation": workload.training.attn_implementation.value}
    return kwargs


def _quantization_kwargs(workload: Workload) -> dict[str, Any] | None:
    quant = workload.quantization
    if quant is None or quant.quant_method != "bitsandbytes":
        return None
    if quant.load_in_8bit:
        kwargs: dict[str, Any] = {"load_in_8bit": True}
        if quant.llm_int8_threshold != 6.0:
            kwargs["llm_int8_threshold"] = quant.llm_int8_threshold
    else:
        kwargs = {"load_in_4bit": True, "bnb_4bit_quant_type": quant.bnb_4bit_quant_type,
                  "bnb_4bit_use_double_quant": quant.bnb_4bit_use_double_quant,
                  "bnb_4bit_compute_dtype": torch_dtype(quant.bnb_4bit_compute_dtype)}
        if quant.bnb_4bit_quant_storage != DType.uint8:
            kwargs["bnb_4bit_quant_storage"] = torch_dtype(quant.bnb_4bit_quant_storage)
    if quant.llm_int8_skip_modules:
        kwargs["llm_int8_skip_modules"] = list(quant.llm_int8_skip_modules)
    return kwargs


def _prepare_kbit(workload: Workload) -> bool:
    quant = workload.quantization
    return quant is not None and quant.quant_method == "bitsandbytes" and quant.prepare_model_for_kbit_training is not False


def _peft_class(workload: Workload) -> str | None:
    if workload.lora is not None:
        return "LoraConfig"
    return PEFT_CLASSES[workload.peft.peft_type] if workload.peft is not None else None


def _peft_kwargs(workload: Workload, classes: ModelClasses) -> dict[str, Any] | None:
    task_type = Code(f"TaskType.{classes.task_type}")
    lora, peft = workload.lora, workload.peft
    if lora is not None:
        alpha = int(lora.lora_alpha) if float(lora.lora_alpha).is_integer() else lora.lora_alpha
        kwargs: dict[str, Any] = {"r": lora.r, "lora_alpha": alpha, "lora_dropout": lora.lora_dropout,
                                  "target_modules": lora.target_modules, "bias": lora.bias}
        if lora.use_dora:
            kwargs["use_dora"] = True
        if lora.use_rslora:
            kwargs["use_rslora"] = True
        if lora.modules_to_save:
            kwargs["modules_to_save"] = list(lora.modules_to_save)
        return {**kwargs, "task_type": task_type}
    if peft is None:
        return None
    kwargs = {"task_type": task_type}
    if peft.peft_type is PeftType.IA3:
        kwargs.update(target_modules=peft.target_modules, feedforward_modules=peft.feedforward_modules)
    elif peft.peft_type is not PeftType.LN_TUNING:
        kwargs["num_virtual_tokens"] = peft.num_virtual_tokens
    return kwargs


def _training_kwargs(workload: Workload, gpu: GPUProfile, classes: ModelClasses) -> dict[str, Any]:
    """TrainingArguments / SFTConfig keywords as planned (train.py makes some of them CPU-aware)."""
    training = workload.training
    half = resolve_half_precision(workload, gpu)
    fsdp = workload.strategy is Strategy.fsdp
    kwargs: dict[str, Any] = {
        "per_device_train_batch_size": training.per_device_train_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "activation_checkpointing": training.gradient_checkpointing and not fsdp,  # FSDP checkpoints itself (fsdp.yaml)
        "optim": training.optim.value,
        "learning_rate": LORA_LEARNING_RATE if workload.lora is not None or workload.peft is not None else FULL_LEARNING_RATE,
        "bf16": half is DType.bfloat16,
        "fp16": half is DType.float16,
    }
    if training.tf32 is not None:
        kwargs["tf32"] = training.tf32
    if classes.trainer == "SFTTrainer":
        kwargs.update(max_length=training.max_seq_length, dataset_text_field="text", packing=False)
    if training.loss_implementation is LossImplementation.fused_linear_cross_entropy:
        kwargs["use_liger_kernel"] = True
    if training.torch_compile:
        kwargs["torch_compile"] = True
    strategy = workload.strategy
    if strategy is Strategy.ddp and (workload.lora is not None or workload.peft is not None):
        kwargs["ddp_find_unused_parameters"] = False
    if strategy in (Strategy.zero1, Strategy.zero2, Strategy.zero3):
        kwargs["deepspeed"] = "deepspeed.json"
    if fsdp:
        kwargs.update(fsdp=True, fsdp_config="fsdp.yaml")
    return kwargs


def uses_bitsandbytes_optimizer(optim: str) -> bool:
    return any(marker in optim for marker in BITSANDBYTES_OPTIMIZER_MARKERS)


def _deepspeed(workload: Workload) -> dict[str, Any] | None:
    """A DeepSpeed config whose "auto" values the Trainer fills from its arguments
    (transformers/integrations/deepspeed.py, HfTrainerDeepSpeedConfig)."""
    distributed = workload.distributed
    stages = {Strategy.zero1: 1, Strategy.zero2: 2, Strategy.zero3: 3}
    if workload.strategy not in stages:
        return None
    stage = stages[workload.strategy]
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if distributed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_gather_16bit_weights_on_model_save=True)
        if distributed.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "zero_optimization": zero,
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}


def _fsdp(workload: Workload) -> dict[str, Any] | None:
    """TrainingArguments.fsdp_config for FSDP2 (transformers 5.24 training_args.py, "Supported keys")."""
    distributed = workload.distributed
    if workload.strategy is not Strategy.fsdp:
        return None
    return {"version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "cpu_offload": distributed.offload_params or distributed.offload_optimizer,
            "activation_checkpointing": workload.training.gradient_checkpointing,
            "cpu_ram_efficient_loading": True, "state_dict_type": "FULL_STATE_DICT"}


def _accelerate(workload: Workload, gpu: GPUProfile) -> dict[str, Any] | None:
    """The launcher config (accelerate launch --config_file accelerate.yaml): one process per GPU;
    DeepSpeed and FSDP are configured through the Trainer's arguments (deepspeed.json, fsdp.yaml)."""
    if workload.hardware.num_gpus == 1 and workload.strategy is Strategy.none:
        return None
    half = resolve_half_precision(workload, gpu)
    precision = {DType.bfloat16: "bf16", DType.float16: "fp16"}.get(half, "no") if half else "no"
    return {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_machines": 1,
            "machine_rank": 0, "num_processes": workload.hardware.num_gpus, "gpu_ids": "all",
            "mixed_precision": precision, "rdzv_backend": "static", "same_network": True, "use_cpu": False}
