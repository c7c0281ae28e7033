"""The web form's state: its flat fields, and how they become a Workload, a permalink, a CLI command
and an API call.

The form speaks the CLI's flags (``--method qlora --batch-size 4 ...``), so its Workload is the one
``vramplan estimate`` builds from the same flags (a test holds them equal), and "copy as CLI
command" gives the same answer as the page. What flags cannot say (``lora.lora_alpha``,
``training.loss_implementation``, offload, ...) goes in the form's ``extra``: Workload JSON merged
over the rest, which is how a plan or a fix of the planner opens as a form.
"""

from __future__ import annotations

import json
import shlex
from typing import Any, Literal
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import UserInputError
from app.jsonlimits import JSONLimitError, parse_json
from app.workload import AttnImplementation, Optim, Strategy, Workload

Method = Literal["full", "lora", "qlora", "int8-lora", "inference"]
LORA_METHODS = ("lora", "qlora", "int8-lora")
METHOD_NAMES = {"full": "Full fine-tuning", "lora": "LoRA", "qlora": "QLoRA", "int8-lora": "LoRA on int8", "inference": "Inference"}
MAX_CONFIG_CHARS = 256 * 1024


class WorkloadForm(BaseModel):
    """What the page's form sends; every field has a default so a partial query string works."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str = Field(default="meta-llama/Llama-3.1-8B", max_length=200)
    config: str = Field(default="", max_length=MAX_CONFIG_CHARS, description="a pasted config.json; replaces model")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gpu: str = Field(default="nvidia-rtx-4090-24gb", max_length=100)
    num_gpus: int = 1
    strategy: Strategy = Strategy.none
    method: Method = "lora"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    lora_r: int = 16
    lora_targets: str = Field(default="all-linear", max_length=500, description="all-linear, module names, or empty for PEFT's default")
    dora: bool = False
    batch_size: int = 2
    seq_len: int = 2048
    grad_accum: int = 1
    max_new_tokens: int = 512
    gradient_checkpointing: bool = True
    optim: Optim = Optim.adamw_torch_fused
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    attn: AttnImplementation = AttnImplementation.sdpa
    extra: str = Field(default="", max_length=MAX_CONFIG_CHARS, description="other Workload fields as JSON, merged over the rest")

    @property
    def uses_config(self) -> bool:
        return bool(self.config.strip())

    def workload_data(self) -> dict[str, Any]:
        """The Workload as JSON data: what the CLI builds from the same flags, with ``extra`` merged in."""
        extra = _json_object(self.extra, "extra", "the other Workload fields") if self.extra.strip() else {}
        return merge(self._flag_data(), extra)

    def _flag_data(self) -> dict[str, Any]:
        config = _json_object(self.config, "config", "the pasted config.json") if self.uses_config else None
        model: dict[str, Any] = {"config": config} if config is not None else {"id": self.model.strip()}
        if self.dtype != "auto":
            model["dtype"] = self.dtype
        data: dict[str, Any] = {"model": model, "task": "inference" if self.method == "inference" else "train"}
        if self.method in LORA_METHODS:
            data["lora"] = {"r": self.lora_r} | ({"target_modules": self.lora_targets.strip()} if self.lora_targets.strip() else {})
            if self.dora:
                data["lora"]["use_dora"] = True
        if self.method == "qlora":
            data["quantization"] = {"load_in_4bit": True, "bnb_4bit_quant_type": self.quant_type,
                                    "bnb_4bit_use_double_quant": self.double_quant}
        elif self.method == "int8-lora":
            data["quantization"] = {"load_in_8bit": True}
        training: dict[str, Any] = {"gradient_accumulation_steps": self.grad_accum, "gradient_checkpointing": self.gradient_checkpointing,
                                    "optim": self.optim.value, "attn_implementation": self.attn.value}
        if self.precision != "auto":
            training |= {"bf16": self.precision == "bf16", "fp16": self.precision == "fp16"}
        if self.method == "inference":
            data["inference"] = {"batch_size": self.batch_size, "prompt_tokens": self.seq_len, "max_new_tokens": self.max_new_tokens}
        else:
            training |= {"per_device_train_batch_size": self.batch_size, "max_seq_length": self.seq_len}
        data["training"] = training
        data["hardware"] = {"gpu": self.gpu.strip(), "num_gpus": self.num_gpus}
        if self.strategy is not Strategy.none:
            data["distributed"] = {"strategy": self.strategy.value}
        return data

    def to_workload(self) -> Workload:
        """Raises UserInputError (bad pasted JSON) or pydantic's ValidationError."""
        return Workload.model_validate(self.workload_data())

    def query(self, **extra: str | int) -> str:
        """The form state as a query string: the permalink's, and the export links'."""
        fields = self.model_dump(mode="json")
        pairs = {name: _query_value(value) for name, value in fields.items() if name not in ("config", "extra") or value.strip()}
        return urlencode({**pairs, **{key: str(value) for key, value in extra.items()}})

    def cli_flags(self) -> list[tuple[str, ...]]:
        """``vramplan estimate`` flags for this form, each with its value (see ``flags_suffice`` for
        what flags cannot say)."""
        flags: list[tuple[str, ...]] = [("--model", self.model.strip()), ("--gpu", self.gpu.strip()), ("--num-gpus", str(self.num_gpus))]
        if self.strategy is not Strategy.none:
            flags.append(("--strategy", self.strategy.value))
        flags.append(("--method", self.method))
        if self.dtype != "auto":
            flags.append(("--dtype", self.dtype))
        flags += [("--batch-size", str(self.batch_size)), ("--seq-len", str(self.seq_len))]
        if self.method == "inference":
            flags.append(("--max-new-tokens", str(self.max_new_tokens)))
        if self.method in LORA_METHODS:
            flags += [("--lora-r", str(self.lora_r)), ("--lora-targets", self.lora_targets.strip())]
            if self.dora:
                flags.append(("--dora",))
        flags += [("--grad-accum", str(self.grad_accum)),
                  ("--gradient-checkpointing",) if self.gradient_checkpointing else ("--no-gradient-checkpointing",),
                  ("--optim", self.optim.value), ("--attn", self.attn.value)]
        if self.precision != "auto":
            flags.append(("--precision", self.precision))
        return flags

    def cli_args(self) -> list[str]:
        return [part for flag in self.cli_flags() for part in flag]

    @property
    def flags_suffice(self) -> bool:
        """Whether CLI flags alone can say this form (they cannot carry a pasted config, other Workload
        fields, 4-bit options other than nf4 with double quantization, or PEFT's default LoRA targets)."""
        if self.uses_config or self.extra.strip() or (self.method in LORA_METHODS and not self.lora_targets.strip()):
            return False
        return self.method != "qlora" or (self.quant_type == "nf4" and self.double_quant)

    def cli_command(self, workload_json: str) -> str:
        """The shell command that gives the same answer as the page."""
        if self.flags_suffice:
            flags = [shlex.join(flag) for flag in self.cli_flags()]
            lines = [" ".join(flags[i:i + 3]) for i in range(0, len(flags), 3)]
            return " \\\n  ".join(["vramplan estimate", *lines])
        return f"cat > workload.json <<'EOF'\n{workload_json}\nEOF\nvramplan estimate --workload workload.json"


class FormInput(BaseModel):
    """A submitted form: the valid state (invalid fields fall back to their defaults), the values to
    show back in the inputs (as sent), and the problems."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    form: WorkloadForm
    shown: dict[str, str]
    error: ValidationError | None = None


def read_form(values: Any) -> FormInput:
    """From a query string or form body (a Starlette multi-dict). The last value of a name wins, so a
    hidden ``false`` before a checkbox gives an unchecked box a value."""
    sent = {name: values.getlist(name)[-1] for name in WorkloadForm.model_fields if values.getlist(name)}
    bad: set[str] = set()
    try:
        form, error = WorkloadForm.model_validate(sent), None
    except ValidationError as invalid:
        bad = {str(item["loc"][0]) for item in invalid.errors() if item["loc"]}
        form, error = WorkloadForm.model_validate({k: v for k, v in sent.items() if k not in bad}), invalid
    shown = {name: _query_value(value) for name, value in form.model_dump(mode="json").items()}
    return FormInput(form=form, shown=shown | {name: str(sent[name]) for name in bad}, error=error)


def _json_object(text: str, field: str, what: str) -> dict[str, Any]:
    """The pasted JSON object, under app.jsonlimits' bounds (depth, NaN, Infinity, huge numbers)."""
    try:
        value = parse_json(text, what)
    except JSONLimitError as error:
        where = f"{field}.{error.field}" if error.field else field
        raise JSONLimitError(where, error.reason, error.value) from error
    if not isinstance(value, dict):
        raise UserInputError(f"{field}: {what} must be a JSON object")
    return value


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` laid over it: objects merged key by key, anything else replaced."""
    merged = dict(base)
    for key, value in patch.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def difference(target: Any, base: Any) -> Any:
    """The smallest patch that ``merge`` lays over ``base`` to give ``target``."""
    if not (isinstance(target, dict) and isinstance(base, dict)):
        return target
    return {key: difference(value, base.get(key)) for key, value in target.items() if key not in base or value != base[key]}


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def curl_command(base_url: str, workload_json: str) -> str:
    """``curl`` posting the Workload to the JSON API."""
    url = shlex.quote(base_url.rstrip("/") + "/api/v1/estimate")
    return f"curl -sS {url} \\\n  -H 'Content-Type: application/json' \\\n  --data-binary @- <<'EOF'\n{workload_json}\nEOF"


def form_from_workload(workload: Workload) -> WorkloadForm | None:
    """The form that says ``workload`` (a plan's, a fix's): its fields, and what they cannot say in
    ``extra``. None when even that does not give the same Workload back."""
    quant = workload.quantization
    inference = workload.task.value == "inference"
    method = workload.method if workload.method != "lora" or quant is None else "int8-lora"
    training = workload.training
    values: dict[str, Any] = {
        "model": workload.model.id or "", "dtype": workload.model.dtype.value if workload.model.dtype else "auto",
        "config": json.dumps(workload.model.config, indent=2) if workload.model.config is not None else "",
        "gpu": workload.hardware.gpu, "num_gpus": workload.hardware.num_gpus, "strategy": workload.strategy,
        "method": method, "grad_accum": training.gradient_accumulation_steps, "optim": training.optim,
        "gradient_checkpointing": training.gradient_checkpointing, "attn": training.attn_implementation,
        "precision": "bf16" if training.bf16 else "fp16" if training.fp16 else "auto" if training.bf16 is None else "fp32",
        "batch_size": workload.inference.batch_size if inference else training.per_device_train_batch_size,
        "seq_len": workload.inference.prompt_tokens if inference else training.max_seq_length,
        "max_new_tokens": workload.inference.max_new_tokens,
    }
    if workload.lora is not None:
        targets = workload.lora.target_modules
        values |= {"lora_r": workload.lora.r, "lora_targets": targets if isinstance(targets, str) else ",".join(targets or []),
                   "dora": workload.lora.use_dora}
    if quant is not None and quant.load_in_4bit:
        values |= {"quant_type": quant.bnb_4bit_quant_type, "double_quant": quant.bnb_4bit_use_double_quant}
    form = WorkloadForm.model_validate(values)
    try:
        flags_only = form.to_workload()
        extra = difference(workload.model_dump(mode="json"), flags_only.model_dump(mode="json"))
        form = form.model_copy(update={"extra": json.dumps(extra)}) if extra else form
        return form if form.to_workload() == workload else None
    except (ValueError, UserInputError):
        return None


def describe_setup(workload: Workload) -> str:
    """One line naming the knobs of a setup: ``QLoRA r=16 · paged_adamw_8bit · micro-batch 4 x 4 · ...``."""
    training, parts = workload.training, []
    method = workload.method
    name = METHOD_NAMES[method]
    quant = workload.quantization
    if method == "lora" and quant is not None:
        name = f"LoRA on int{quant.weight_bits}" if quant.quant_method == "bitsandbytes" else f"LoRA on {quant.quant_method}"
    elif method == "qlora" and quant is not None:
        name = f"QLoRA {quant.bnb_4bit_quant_type}" if quant.quant_method == "bitsandbytes" else f"QLoRA {quant.quant_method}"
    if workload.lora is not None:
        targets = workload.lora.target_modules
        where = targets if isinstance(targets, str) else ", ".join(targets) if targets else "PEFT's default targets"
        name += f" r={workload.lora.r} ({where})"
    parts.append(name)
    if method == "inference":
        inference = workload.inference
        parts += [f"batch {inference.batch_size}", f"{inference.prompt_tokens} + {inference.max_new_tokens} tokens"]
    else:
        parts += [training.optim.value, f"micro-batch {training.per_device_train_batch_size} x {training.gradient_accumulation_steps}",
                  f"seq {training.max_seq_length}", "checkpointing" if training.gradient_checkpointing else "no checkpointing"]
    parts.append(training.attn_implementation.value)
    if training.frozen_layers and workload.lora is None:
        parts.append(f"first {training.frozen_layers} blocks frozen")
    if training.loss_implementation.value != "cross_entropy" and method != "inference":
        parts.append(training.loss_implementation.value)
    if workload.strategy is not Strategy.none:
        offload = [name for name, on in (("optimizer", workload.distributed.offload_optimizer),
                                         ("parameters", workload.distributed.offload_params)) if on]
        parts.append(f"{workload.strategy.value} on {workload.hardware.num_gpus} GPUs"
                     + (f", {' and '.join(offload)} offloaded" if offload else ""))
    return " · ".join(parts)
