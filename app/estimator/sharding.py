"""Model states per GPU: what DDP, ZeRO-1/2/3, FSDP, CPU offload and tensor parallelism keep on
each device.

ZeRO (Rajbhandari et al., arXiv:1910.02054, section 5 and figure 1): with N data-parallel ranks,
stage 1 partitions optimizer states (and fp32 masters), stage 2 also gradients, stage 3 also the
16-bit parameters. FSDP FULL_SHARD shards like stage 3. Tensor parallelism divides the linear
layers' weights, gradients and states by its degree (Megatron-LM, arXiv:1909.08053).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from app.estimator.model import ResolvedModel
from app.estimator.peft_methods import peft_tensor_groups
from app.estimator.setup import Precision, Setup
from app.estimator.states import (
    GRADIENT_FREE_OPTIMIZERS,
    OPTIMIZER_STATES,
    PAGED_OPTIMIZERS,
    ParameterCounts,
    count_parameters_detail,
    is_quantized,
    optimizer_state_bytes,
    trainable_dtype,
    trainable_tensor_groups,
    weight_terms,
)
from app.estimator.versions import foreach_by_default
from app.units import DType, tensor_bytes
from app.workload import Optim, Strategy, Task, Workload

ZERO = (Strategy.zero1, Strategy.zero2, Strategy.zero3)
# torch optimizers that run foreach on CUDA by default (rule torch2_foreach_default); adamw_hf was
# transformers' own AdamW, a loop over parameters (transformers 4.x optimization.py).
FOREACH_OPTIMIZERS = {Optim.adamw_torch, Optim.adagrad, Optim.rmsprop, Optim.sgd, Optim.schedule_free_adamw}
LOOP_OPTIMIZERS = {Optim.adamw_hf}


class StateBytes(BaseModel):
    """Per-GPU bytes of the long-lived states, and the counts behind them."""

    model_config = ConfigDict(frozen=True)

    counts: ParameterCounts
    weights: int
    quantization_constants: int
    lora_adapters: int
    master_weights: int
    gradients: int
    optimizer_states: int
    paged_bytes: int
    optimizer_step_temporary: int
    communication_buffers: int
    largest_weight_bytes: int  # one quantized linear, dequantized to the compute dtype
    gathered_layer_bytes: int  # ZeRO-3/FSDP: one block's 16-bit parameters gathered

    @property
    def model_state_bytes(self) -> int:
        return (
            self.weights + self.quantization_constants + self.lora_adapters + self.master_weights
            + self.gradients + self.optimizer_states
        )


def _uses_fp32_masters(setup: Setup) -> bool:
    """DeepSpeed keeps fp32 master weights (and fp32 optimizer states) for 16-bit training
    (deepspeed/runtime/bf16_optimizer.py, fp16/fused_optimizer.py)."""
    return setup.strategy in ZERO and setup.task is Task.train and setup.compute_dtype != DType.float32 and setup.full_trainable


def per_gpu_states(model: ResolvedModel, setup: Setup, workload: Workload) -> StateBytes:
    """Weights, constants, adapters, masters, gradients and optimizer states on one GPU."""
    counts = count_parameters_detail(model.modules, setup, workload)
    base = weight_terms(model.modules, setup, workload)
    training = setup.task is Task.train
    peft_groups = peft_tensor_groups(workload.peft, model.arch, model.modules) if workload.peft and model.arch else []
    if peft_groups:  # PEFT keeps these in fp32 (autocast_adapter_dtype=True)
        numel = sum(g.numel * g.count for g in peft_groups)
        counts = counts.model_copy(update={"trainable": numel, "adapter": numel})
        base["lora_adapters"] = tensor_bytes(numel, DType.float32)
    masters = _uses_fp32_masters(setup)
    grad_dtype = DType(setup.compute_dtype) if masters else trainable_dtype(setup, workload)
    if peft_groups:
        grad_dtype = DType.float32
    if masters and setup.precision is Precision.amp:
        base["weights"] = tensor_bytes(counts.total, setup.compute_dtype)
    optim = workload.training.optim
    groups = (peft_groups or trainable_tensor_groups(model.modules, setup, workload)) if training else []
    grads = tensor_bytes(counts.trainable, grad_dtype) if training and optim not in GRADIENT_FREE_OPTIMIZERS else 0
    states = optimizer_state_bytes(groups, DType.float32 if masters else grad_dtype, optim) if training else 0
    master = tensor_bytes(counts.trainable, DType.float32) if masters else 0
    dp, tp = setup.data_parallel, setup.tensor_parallel
    strategy = setup.strategy
    shard_states = dp if strategy in ZERO or strategy is Strategy.fsdp else 1
    shard_grads = dp if strategy in (Strategy.zero2, Strategy.zero3, Strategy.fsdp) else 1
    shard_weights = dp if strategy in (Strategy.zero3, Strategy.fsdp) else 1
    if not training:  # inference over several GPUs: device_map="auto" splits the blocks (accelerate)
        shard_weights = dp
    offload_opt = workload.distributed.offload_optimizer
    offload_params = workload.distributed.offload_params
    weights = 0 if offload_params else _ceil_div(base["weights"], shard_weights * tp)
    optimizer = 0 if offload_opt else _ceil_div(states, shard_states * tp)
    master = 0 if offload_opt else _ceil_div(master, shard_states * tp)
    # ZeRO-Offload moves the gradient partitions to CPU with the optimizer (ZeRO-Offload paper,
    # arXiv:2101.06840 s.4.1); only the reduce buckets (communication_buffers) stay on the GPU.
    offloads_grads = offload_opt and strategy in (Strategy.zero2, Strategy.zero3)
    gradients = 0 if offloads_grads else _ceil_div(grads, shard_grads * tp)
    paged = optimizer if optim in PAGED_OPTIMIZERS else 0
    return StateBytes(
        counts=counts,
        weights=weights,
        quantization_constants=_ceil_div(base["quantization_constants"], shard_weights * tp),
        lora_adapters=_ceil_div(base["lora_adapters"], tp),
        master_weights=master,
        gradients=gradients,
        optimizer_states=optimizer,
        paged_bytes=paged,
        optimizer_step_temporary=(_deepspeed_fp32_grad_copy(counts.trainable, grad_dtype, shard_states * tp) if masters and not offload_opt
                                  else _step_temporary(optim, groups, grad_dtype, shard_states * tp, offload_opt,
                                                       foreach_by_default(workload.software))),
        communication_buffers=_communication_buffers(model, setup, grads),
        largest_weight_bytes=_largest_quantized(model, setup, workload),
        gathered_layer_bytes=_gathered_layer(model, setup),
    )


def _deepspeed_fp32_grad_copy(trainable: int, grad_dtype: DType, shards: int) -> int:
    """DeepSpeed's step with fp32 masters flattens the 16-bit gradient partition (a copy) and casts it
    to fp32 for the optimizer, both alive at once: ``self.flatten(self.averaged_gradients[i]).to(fp32)``
    (deepspeed 0.14 runtime/zero/stage_1_and_2.py step, stage3.py _prepare_fp32_grad_for_sub_group).
    Its FusedAdam updates in place, with no temporaries of its own."""
    partition = _ceil_div(trainable, shards)
    return tensor_bytes(partition, grad_dtype) + tensor_bytes(partition, DType.float32)


def _ceil_div(value: int, parts: int) -> int:
    return -(-value // parts)


def _step_temporary(optim: Optim, groups, dtype: DType, shards: int, offloaded: bool, foreach: bool) -> int:
    """torch's foreach optimizers (the CUDA default for adamw_torch since torch 2.0) hold one
    parameter-sized temporary list during step (torch/optim/adam.py, _multi_tensor_adam:
    exp_avg_sq_sqrt); the per-parameter loops (torch 1.x, transformers' adamw_hf) one tensor at a
    time (``denom = exp_avg_sq.sqrt()``); fused and bitsandbytes optimizers none."""
    if offloaded or not groups:
        return 0
    states, kind = OPTIMIZER_STATES[optim]
    largest = max(g.numel for g in groups)
    if optim in FOREACH_OPTIMIZERS and states > 0:
        if not foreach:
            return tensor_bytes(largest, dtype)
        numel = sum(g.numel * g.count for g in groups)
        return _ceil_div(tensor_bytes(numel, dtype), shards)
    if optim in LOOP_OPTIMIZERS:
        return tensor_bytes(largest, dtype)
    if kind == "factored":
        return 3 * largest * 4  # fp32 copies of grad, update and the squared update
    return 0


def _communication_buffers(model: ResolvedModel, setup: Setup, grad_bytes: int) -> int:
    """DDP's gradient buckets (a full copy of the gradients; torch/nn/parallel/distributed.py with
    gradient_as_bucket_view=False) or ZeRO's reduce bucket (hidden^2 elements under HF "auto")."""
    if setup.task is not Task.train or setup.data_parallel * setup.tensor_parallel == 1:
        return 0
    if setup.strategy is Strategy.ddp:
        return grad_bytes
    hidden = model.arch.hidden_size if model.arch else 4096
    return 2 * hidden * hidden * 2


def _largest_quantized(model: ResolvedModel, setup: Setup, workload: Workload) -> int:
    """bitsandbytes dequantizes a 4-bit weight for backward, ``F.dequantize_4bit(B, state).to(dtype)``
    (bitsandbytes/autograd/_functions.py MatMul4Bit.backward): the weight in its original (load)
    dtype, plus a cast when the compute dtype differs; 8-bit weights likewise. One weight at a time."""
    if setup.quant_bits is None:
        return 0
    largest = max((m.weight_numel for m in model.modules if is_quantized(m, setup, workload)), default=0)
    if not largest:
        return 0
    stored = setup.weight_dtype if setup.weight_dtype in (DType.float16, DType.bfloat16) else DType.float16
    transient = tensor_bytes(largest, stored)
    if setup.compute_dtype != stored:
        transient += tensor_bytes(largest, setup.compute_dtype)
    return transient


def _gathered_layer(model: ResolvedModel, setup: Setup) -> int:
    """ZeRO-3/FSDP all-gather one block's parameters (and prefetch the next): two blocks' worth."""
    if setup.strategy not in (Strategy.zero3, Strategy.fsdp) or setup.data_parallel == 1:
        return 0
    per_layer = sum(m.numel for m in model.modules if m.per_layer)
    layers = model.arch.total_layers if model.arch else 1
    dtype = setup.compute_dtype if setup.compute_dtype != DType.float32 else setup.weight_dtype
    return 2 * tensor_bytes(per_layer // max(layers, 1), dtype)
