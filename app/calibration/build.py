"""Build the real Hugging Face model that a Workload describes, without weights.

The model comes from its ``config.json`` through the Auto classes, on the device given: ``meta``
for counting, a real device for measuring, or ``cpu`` inside an active ``FakeTensorMode`` for the
simulation (every tensor is then a fake CPU tensor that owns no memory). What a real load and a
TRL/PEFT training script do to it is done by the libraries' own code, in the same order:

1. ``AutoModelFor*.from_config(config, dtype=..., attn_implementation=...)``;
2. bitsandbytes: transformers' quantizer swaps ``nn.Linear`` for ``Linear4bit``/``Linear8bitLt``
   (``Bnb4BitHfQuantizer._process_model_before_weight_loading``, head and ``_keep_in_fp32_modules``
   left unquantized), then each weight is quantized the way ``Bnb4bitQuantize.convert`` does it
   (transformers/integrations/bitsandbytes.py);
3. frozen blocks (full fine-tuning), ``peft.prepare_model_for_kbit_training`` (casts every 16-bit
   parameter that is not ``Params4bit`` to fp32: peft/utils/other.py:205-209), gradient
   checkpointing with ``use_reentrant=False``, ``get_peft_model`` (adapters autocast to fp32,
   ``autocast_adapter_dtype=True``), the adapter cast TRL applies (trl/trainer/sft_trainer.py:907-911).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from app.calibration.patches import patched
from app.workload import Quantization, Task, Workload

if TYPE_CHECKING:
    import torch
    from torch import nn

# Keys of a config.json that describe a checkpoint rather than the architecture.
_CHECKPOINT_ONLY_KEYS = ("quantization_config", "auto_map", "_name_or_path", "transformers_version")
ENCODER_ONLY_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "albert", "camembert", "mpnet", "modernbert"}
)
# Attention implementations that need CUDA-only packages: simulated through SDPA, whose CUDA flash
# kernel saves the same tensors (output and fp32 log-sum-exp).
_SIMULATED_AS_SDPA = {"flash_attention_2", "flash_attention_3", "flex_attention"}


def hf_config(config: dict[str, Any]) -> Any:
    """The transformers ``PretrainedConfig`` for a ``config.json`` dict."""
    from transformers import AutoConfig

    data = {key: value for key, value in config.items() if key not in _CHECKPOINT_ONLY_KEYS}
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError("the config has no model_type; vramplan needs it to pick the architecture")
    return AutoConfig.for_model(model_type, **data)


def auto_model_class(config: dict[str, Any]) -> Any:
    """Seq2Seq LM for encoder-decoders (T5), sequence classification for BERT-likes, else causal LM."""
    import transformers

    if config.get("is_encoder_decoder"):
        return transformers.AutoModelForSeq2SeqLM
    if config.get("model_type") in ENCODER_ONLY_MODEL_TYPES:
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForCausalLM


def weight_dtype(workload: Workload, config: dict[str, Any]) -> torch.dtype:
    """``model.dtype``, else the config's ``dtype``/``torch_dtype`` (transformers 5 ``dtype="auto"``), else fp32."""
    import torch

    name = workload.model.dtype or config.get("dtype") or config.get("torch_dtype") or "float32"
    name = str(name).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"weights cannot be loaded in {name!r}; use float32, bfloat16 or float16")
    return dtype


def attention_implementation(workload: Workload) -> str:
    """The ``attn_implementation`` the simulation builds with (see ``_SIMULATED_AS_SDPA``)."""
    name = workload.training.attn_implementation.value
    return "sdpa" if name in _SIMULATED_AS_SDPA else name


def build_model(config: dict[str, Any], workload: Workload, device: str = "meta", attn_implementation: str | None = None) -> nn.Module:
    """The model ``workload`` trains (or serves), with quantization, LoRA and checkpointing applied."""
    import torch

    if workload.peft is not None and _fake_mode_active():
        # Prompt/prefix/LN tuning move new modules with .to(), which neither fake nor meta
        # parameters survive: build everything on meta, then give it fake storage.
        with _real_tensors():
            model = build_model(config, workload, "meta", attn_implementation)
        materialize_fake(model)
        _fake_prompt_tokens(model)
        return model
    dtype = weight_dtype(workload, config)
    attn = attn_implementation or attention_implementation(workload)
    model = instantiate(config, dtype, attn, device)
    if workload.quantization is not None:
        quantize_bnb(model, workload.quantization, dtype, torch.device(device))
    training = workload.task is Task.train
    model.train(training)
    if training:
        model = prepare_for_training(model, workload)
    return model


def instantiate(config: dict[str, Any], dtype: torch.dtype, attn: str, device: str) -> nn.Module:
    """``AutoModelFor*.from_config`` on ``device``; eager attention where SDPA is not supported."""
    import torch

    cls = auto_model_class(config)
    with torch.device(device):
        try:
            return cls.from_config(hf_config(config), dtype=dtype, attn_implementation=attn)
        except ValueError as error:
            if attn != "sdpa" or "does not support" not in str(error):
                raise
            return cls.from_config(hf_config(config), dtype=dtype, attn_implementation="eager")


def count_parameters(config: dict[str, Any]) -> int:
    """Exact parameter count of the plain model built on the meta device (tied weights once)."""
    import torch

    model = instantiate(config, torch.float32, "eager", "meta")
    return sum(parameter.numel() for parameter in model.parameters())


def count_parameters_by_module(config: dict[str, Any]) -> dict[str, int]:
    """Parameter counts by name pattern, block indices folded: ``model.layers.*.mlp.up_proj.weight``."""
    import torch

    model = instantiate(config, torch.float32, "eager", "meta")
    counts: dict[str, int] = defaultdict(int)
    for name, parameter in model.named_parameters():
        counts[re.sub(r"\.\d+\.", ".*.", name)] += parameter.numel()
    return dict(counts)


# -- bitsandbytes ----------------------------------------------------------------------------
def bnb_config(quantization: Quantization) -> Any:
    """The ``BitsAndBytesConfig`` a user would pass for ``quantization``."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantization.quant_method != "bitsandbytes":
        raise NotImplementedError(f"{quantization.quant_method} bases cannot be built without their checkpoint; only bitsandbytes")
    return BitsAndBytesConfig(
        load_in_4bit=quantization.load_in_4bit,
        load_in_8bit=quantization.load_in_8bit,
        bnb_4bit_quant_type=quantization.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=quantization.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quantization.bnb_4bit_compute_dtype.value),
        bnb_4bit_quant_storage=getattr(torch, quantization.bnb_4bit_quant_storage.value),
        llm_int8_skip_modules=quantization.llm_int8_skip_modules,
        llm_int8_threshold=quantization.llm_int8_threshold,
    )


def quantize_bnb(model: nn.Module, quantization: Quantization, dtype: torch.dtype, device: torch.device) -> None:
    """Swap linear layers for bitsandbytes ones and quantize their weights, as ``from_pretrained`` does."""
    import bitsandbytes as bnb
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(bnb_config(quantization), pre_quantized=False)
    originals = {name: module for name, module in model.named_modules()}
    with _real_tensors():  # bitsandbytes' Params4bit cannot wrap a FakeTensor, even on meta
        quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": str(device)})
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            _load_linear_4bit(module, originals[name])
        elif isinstance(module, bnb.nn.Linear8bitLt):
            _load_linear_8bit(module, originals[name])
    quantizer.postprocess_model(model)


def _source_weight(module: nn.Module, original: nn.Module) -> torch.Tensor:
    """The full-precision weight as ``[out, in]`` (Conv1D keeps ``[in, out]``: transformers transposes)."""
    from transformers.pytorch_utils import Conv1D

    weight = original.weight.detach()
    if module.bias is not None:
        module.bias = original.bias
    return weight.T.contiguous() if isinstance(original, Conv1D) else weight


def _load_linear_4bit(module: nn.Module, original: nn.Module) -> None:
    """``Bnb4bitQuantize.convert``: ``Params4bit(weight, **meta_param.__dict__).to(device)``."""
    import bitsandbytes as bnb
    import torch

    weight = _source_weight(module, original)
    attrs = dict(module.weight.__dict__)
    if weight.device.type == "meta":
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, **attrs)
        return
    if not _is_fake(weight):
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, **attrs).to(weight.device)
        return
    packed, quant_state = bnb.functional.quantize_4bit(
        weight,
        blocksize=attrs["blocksize"],
        compress_statistics=attrs["compress_statistics"],
        quant_type=attrs["quant_type"],
        quant_storage=attrs["quant_storage"],
    )
    # A plain Parameter carrying Params4bit's attributes: Params4bit cannot wrap a FakeTensor.
    parameter = torch.nn.Parameter(packed, requires_grad=False)
    for key in ("blocksize", "compress_statistics", "quant_type", "quant_storage"):
        setattr(parameter, key, attrs[key])
    parameter.quant_state, parameter.bnb_quantized, parameter.module = quant_state, True, module
    module.weight = parameter
    module.quant_state = quant_state


def _load_linear_8bit(module: nn.Module, original: nn.Module) -> None:
    """``Bnb8bitQuantize.convert``: ``Int8Params(weight, **meta_param.__dict__).to(device)``."""
    import bitsandbytes as bnb
    import torch

    weight = _source_weight(module, original)
    attrs = {key: value for key, value in module.weight.__dict__.items() if key != "SCB"}
    if weight.device.type == "meta":
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, **attrs)
        return
    if not _is_fake(weight):  # quantized when moved from the CPU (bitsandbytes/nn/modules.py Int8Params.to)
        module.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, **attrs).to(weight.device)
        return
    int8_weight, row_scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
    parameter = torch.nn.Parameter(int8_weight, requires_grad=False)
    parameter.CB, parameter.SCB, parameter.has_fp16_weights = int8_weight, row_scales, False
    module.weight = parameter


def materialize_fake(model: nn.Module) -> None:
    """Replace every meta parameter and buffer by an (uninitialized) tensor on the CPU: a fake one
    inside a fake mode. bitsandbytes weights are quantized on the way; tied weights stay tied."""
    import bitsandbytes as bnb
    import torch

    made: dict[int, Any] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) and weight is not None and weight.device.type == "meta":
            full = torch.nn.Module()
            full.weight = torch.nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype), requires_grad=False)
            full.bias = module.bias
            load = _load_linear_4bit if isinstance(module, bnb.nn.Linear4bit) else _load_linear_8bit
            load(module, full)
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and parameter.device.type == "meta":
                if id(parameter) not in made:
                    data = torch.empty(parameter.shape, dtype=parameter.dtype)
                    made[id(parameter)] = torch.nn.Parameter(data, requires_grad=parameter.requires_grad)
                module._parameters[name] = made[id(parameter)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type == "meta":
                module._buffers[name] = made.setdefault(id(buffer), torch.empty(buffer.shape, dtype=buffer.dtype))


def _fake_prompt_tokens(model: nn.Module) -> None:
    """Prompt-learning PeftModels keep real index tensors in a dict (peft_model.py ``prompt_tokens``)."""
    from torch._guards import detect_fake_mode

    tokens = getattr(model, "prompt_tokens", None)
    if isinstance(tokens, dict):
        fake_mode = detect_fake_mode()
        model.prompt_tokens = {name: fake_mode.from_tensor(value) for name, value in tokens.items()}


def _fake_mode_active() -> bool:
    from torch._guards import detect_fake_mode

    return detect_fake_mode() is not None


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(tensor)


@contextmanager
def _real_tensors():
    """Leave an active FakeTensorMode for the duration (a no-op without one)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        yield


# -- training set-up ---------------------------------------------------------------------------
def prepare_for_training(model: nn.Module, workload: Workload) -> nn.Module:
    """Frozen blocks, k-bit preparation, gradient checkpointing and LoRA, as a TRL script does them.

    Returns the model to train (the ``PeftModel`` when LoRA is used); ``model`` is changed in place.
    """
    training = workload.training
    gc_kwargs = {"use_reentrant": False}  # transformers 5 default (modeling_utils.py:3157-3158), TRL's too
    if workload.lora is None and training.frozen_layers:
        freeze_first_blocks(model, training.frozen_layers)
    quantization = workload.quantization
    if quantization is not None and quantization.prepare_model_for_kbit_training is not False:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=training.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    if training.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
    if workload.lora is not None:
        return apply_lora(model, workload)
    if workload.peft is not None:
        return apply_peft(model, workload)
    return model


def apply_lora(model: nn.Module, workload: Workload) -> nn.Module:
    """``get_peft_model`` with the Workload's ``LoraConfig``, then the adapter dtype cast."""
    import torch
    from peft import LoraConfig

    lora = workload.lora
    assert lora is not None
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        modules_to_save=lora.modules_to_save,
        task_type=_peft_task_type(model),
    )
    peft_model = _get_peft_model(model, config, workload)
    adapter_dtype = getattr(torch, lora.adapter_dtype.value)
    for name, parameter in peft_model.named_parameters():
        if parameter.requires_grad and "lora_magnitude_vector" not in name and parameter.dtype != adapter_dtype:
            parameter.data = parameter.data.to(adapter_dtype)
    return peft_model


def _get_peft_model(model: nn.Module, config: Any, workload: Workload) -> nn.Module:
    """``get_peft_model``; then input gradients for checkpointing (trl/trainer/sft_trainer.py:899-900)."""
    import torch
    from peft import get_peft_model

    # With fake weights the adapters are made on the real meta device, then given fake storage:
    # PEFT moves new adapters with module._apply, which cannot swap fake parameters
    # (torch/nn/modules/module.py:984-990); on meta it leaves them be (peft tuners_utils.py:2199).
    if any(_is_fake(parameter) for parameter in model.parameters()):
        _to_meta(model, _copied_modules(config))
        with _real_tensors(), torch.device("meta"), _dora_magnitude_by_shape():
            peft_model = get_peft_model(model, config)
        _materialize_meta_parameters(peft_model)
    else:
        peft_model = get_peft_model(model, config)
    if workload.training.gradient_checkpointing:
        peft_model.enable_input_require_grads()
    return peft_model


@contextmanager
def _dora_magnitude_by_shape() -> Iterator[None]:
    """DoRA's magnitude made from shapes and dtypes only: PEFT computes it as the norm of the base
    weight plus the LoRA product (peft/tuners/lora/dora.py ``DoraLinearLayer.update_layer``), which
    mixes the fake base weights with the new meta adapters. Its values never matter here; its
    length (out features, ``lora_B``'s rows) and dtype (the base weight's, dequantized, promoted
    with the adapters', as ``get_weight_norm`` returns it) are PEFT's."""
    import torch
    from peft.tuners.lora.dora import DoraLinearLayer

    def update_layer(self: Any, *, base_layer: Any, lora_A: Any, lora_B: Any, scaling: float, place_on_cpu: bool = False) -> None:
        weight = base_layer.weight
        quant_state = getattr(weight, "quant_state", None)
        base_dtype = quant_state.dtype if quant_state is not None else weight.dtype
        if not base_dtype.is_floating_point:  # LLM.int8 weights dequantize to fp16 (peft/utils/integrations.py)
            base_dtype = torch.float16
        dtype = torch.promote_types(base_dtype, lora_A.dtype)
        self.weight = torch.nn.Parameter(torch.empty(lora_B.shape[0], dtype=dtype, device="meta"), requires_grad=True)

    with patched(DoraLinearLayer, "update_layer", update_layer):
        yield


def apply_peft(model: nn.Module, workload: Workload) -> nn.Module:
    """A PEFT method other than LoRA (IA3, prompt/P-/prefix tuning, LN tuning), PEFT's own config."""
    import peft

    spec = workload.peft
    assert spec is not None
    task_type = spec.task_type or _peft_task_type(model)
    classes = {
        "IA3": (peft.IA3Config, {"target_modules": spec.target_modules, "feedforward_modules": spec.feedforward_modules}),
        "PROMPT_TUNING": (peft.PromptTuningConfig, {"num_virtual_tokens": spec.num_virtual_tokens}),
        "P_TUNING": (peft.PromptEncoderConfig, {"num_virtual_tokens": spec.num_virtual_tokens}),
        "PREFIX_TUNING": (peft.PrefixTuningConfig, {"num_virtual_tokens": spec.num_virtual_tokens}),
        "LN_TUNING": (peft.LNTuningConfig, {"target_modules": spec.target_modules}),
    }
    cls, kwargs = classes[spec.peft_type.value]
    config = cls(task_type=task_type, **{key: value for key, value in kwargs.items() if value is not None})
    return _get_peft_model(model, config, workload)


def _copied_modules(config: Any) -> list[str]:
    """Modules PEFT deep-copies (``modules_to_save``; a classification head for SEQ_CLS,
    peft/peft_model.py PeftModelForSequenceClassification)."""
    names = list(getattr(config, "modules_to_save", None) or [])
    if str(getattr(config, "task_type", "")).endswith("SEQ_CLS"):
        names += ["classifier", "score"]
    return names


def _to_meta(model: nn.Module, names: list[str]) -> None:
    """Turn the fake parameters of the modules PEFT will deep-copy into meta ones: a fake tensor
    deep-copied outside its mode gets a fake mode of its own, which later ops refuse to mix;
    ``_materialize_meta_parameters`` gives both the module and its copy fake storage afterwards."""
    import torch

    for module_name, module in model.named_modules():
        if not any(module_name == name or module_name.endswith("." + name) for name in names):
            continue
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and _is_fake(parameter):
                with _real_tensors():
                    meta = torch.empty(tuple(parameter.shape), dtype=parameter.dtype, device="meta")
                module._parameters[name] = torch.nn.Parameter(meta, requires_grad=parameter.requires_grad)


def _materialize_meta_parameters(model: nn.Module) -> None:
    """Give every meta parameter an (uninitialized) CPU tensor; fake inside a fake mode."""
    import torch

    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and parameter.device.type == "meta":
                data = torch.empty(parameter.shape, dtype=parameter.dtype, device="cpu")
                module._parameters[name] = torch.nn.Parameter(data, requires_grad=parameter.requires_grad)


def _peft_task_type(model: nn.Module) -> str:
    if getattr(model.config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    if model.config.model_type in ENCODER_ONLY_MODEL_TYPES:
        return "SEQ_CLS"
    return "CAUSAL_LM"


def freeze_first_blocks(model: nn.Module, count: int) -> None:
    """``requires_grad=False`` on the first ``count`` blocks of the longest block list."""
    from torch import nn

    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList)]
    if not lists:
        raise ValueError("the model has no list of blocks to freeze")
    blocks = max(lists, key=len)
    if count > len(blocks):
        raise ValueError(f"training.frozen_layers is {count} but the model has {len(blocks)} blocks")
    for block in list(blocks)[:count]:
        block.requires_grad_(False)
