"""The high-water mark of one step, phase by phase.

A training step's live bytes rise through the forward pass (saved activations), peak around the
loss or the start of backward (logits and their gradients), trade activations for gradients
through backward, and end in the optimizer step (gradients, states and step temporaries). Each
phase's live set is the sum of named terms; the estimate's terms are those of the peak phase.
"""

from __future__ import annotations

from collections import Counter

from pydantic import BaseModel, ConfigDict

from app.estimator.activations import block_activations
from app.estimator.architecture import Architecture, Kind
from app.estimator.autocast import autocast_copies
from app.estimator.blocks_ops import FP32
from app.estimator.dora import dora_transient_bytes
from app.estimator.logits import decoder_tokens, kv_cache_bytes, logits_buffers, logits_dtype_bytes, tokens_per_micro_batch
from app.estimator.model import ResolvedModel
from app.estimator.params import ModuleKind
from app.estimator.peft_methods import prefix_tokens
from app.estimator.setup import SIXTEEN_BIT, Precision, Setup
from app.estimator.sharding import StateBytes
from app.estimator.versions import (
    frees_gradients_between_steps,
    has_per_layer_rotary_caches,
    holds_previous_cache_while_decoding,
    prefill_keeps_last_logits_only,
)
from app.units import DType, dtype_bytes, tensor_bytes
from app.workload import AttnImplementation, Workload


class PhasePeaks(BaseModel):
    model_config = ConfigDict(frozen=True)

    peak_bytes: int
    peak_phase: str
    terms: dict[str, int]  # the live set at the peak, by term
    by_phase: dict[str, int]
    transient_bytes: int  # bytes at the peak that are not long-lived states


class ActivationBytes(BaseModel):
    model_config = ConfigDict(frozen=True)

    saved: int  # all blocks' saved activations (or checkpointed inputs)
    one_block: int  # one block's activations, recomputed under gradient checkpointing
    autocast_cache: int  # 16-bit copies of fp32 weights kept by autocast for backward


def _static_terms(states: StateBytes, model: ResolvedModel, setup: Setup, workload: Workload) -> dict[str, int]:
    terms = {
        "weights": states.weights,
        "quantization_constants": states.quantization_constants,
        "lora_adapters": states.lora_adapters,
        "master_weights": states.master_weights,
        "optimizer_states": states.optimizer_states,
        "communication_buffers": states.communication_buffers,
    }
    rotary = rotary_cache_bytes(model.arch, setup, workload)
    if rotary:
        terms["rotary_caches"] = rotary
    return terms


def rotary_cache_bytes(arch: Architecture | None, setup: Setup, workload: Workload) -> int:
    """cos and sin tables of max_position_embeddings x head_dim in every attention layer (rule
    transformers4_rotary_caches), per GPU."""
    if arch is None or not arch.max_position_embeddings or not has_per_layer_rotary_caches(arch.family, workload.software):
        return 0
    per_layer = 2 * arch.max_position_embeddings * arch.head_dim * int(dtype_bytes(setup.weight_dtype if setup.weight_dtype in SIXTEEN_BIT else DType.float32))
    # buffers are replicated by DDP and not sharded by ZeRO/FSDP; device_map spreads inference layers over the GPUs
    return arch.total_layers * per_layer // (workload.hardware.num_gpus if workload.task.value == "inference" else 1)


def training_activations(model: ResolvedModel, setup: Setup, workload: Workload) -> ActivationBytes:
    """Saved activations of the whole forward pass, per GPU (micro-batch per device)."""
    arch = model.arch
    if arch is None:
        return ActivationBytes(saved=0, one_block=0, autocast_cache=0)
    tokens = tokens_per_micro_batch(workload)
    batch = workload.training.per_device_train_batch_size
    enc_len = tokens // batch
    dec_len = decoder_tokens(arch, workload) // batch
    frozen = workload.training.frozen_layers
    encdec = arch.kind is Kind.encoder_decoder
    past = 0 if encdec else prefix_tokens(workload.peft)  # prefix tuning's past keys and values, per sequence
    # blocks of one kind (trainable or frozen, encoder or decoder) save the same bytes: count them
    kinds = Counter((setup.full_trainable and index >= frozen, encdec and index >= arch.num_layers) for index in range(arch.total_layers))
    blocks = {kind: block_activations(arch, model.modules, setup, workload, kind[0], decoder=kind[1]) for kind in kinds}
    per_kind = {
        kind: int((layer.block_bytes(batch, dec_len, memory_len=enc_len) if kind[1] else layer.block_bytes(batch, enc_len, memory_len=past))
                  / setup.tensor_parallel)
        for kind, layer in blocks.items()
    }
    # gradient checkpointing keeps each block's input: the previous block's output, in its dtype
    output_size = max(layer.output_size for layer in blocks.values()) or int(dtype_bytes(setup.residual_dtype))
    hidden = tokens * arch.hidden_size * output_size
    embeddings = hidden
    if workload.training.gradient_checkpointing:
        # bitsandbytes' 8-bit matmul keeps its input on ctx, out of checkpointing's reach
        # (autograd/_functions.py MatMul8bitLt: ``ctx.tensors = (CAt, subA, A)``)
        kept = sum(blocks[kind].kept_under_checkpointing * count for kind, count in kinds.items())
        saved = hidden * arch.total_layers + embeddings + int(kept * tokens / setup.tensor_parallel)
    else:
        saved = sum(per_kind[kind] * count for kind, count in kinds.items()) + embeddings
    return ActivationBytes(saved=saved, one_block=max(per_kind.values()), autocast_cache=0)


def phase_peaks(model: ResolvedModel, setup: Setup, workload: Workload, states: StateBytes) -> PhasePeaks:
    """Live bytes per phase and the peak among them."""
    if workload.task.value == "inference":
        return _inference_peaks(model, setup, workload, states)
    static = _static_terms(states, model, setup, workload)
    acts = training_activations(model, setup, workload)
    copies = autocast_copies(model, setup, workload)
    logits_fwd, logits_bwd = logits_buffers(model.arch, setup, workload) if model.arch else (0, 0)
    # Gradients outlive the forward pass when they accumulate over micro-batches, or when
    # zero_grad() zeroes rather than frees them (rule torch2_zero_grad_set_to_none).
    accumulating = workload.training.gradient_accumulation_steps > 1 or not frees_gradients_between_steps(workload.software)
    grads_in_forward = states.gradients if accumulating else 0
    gc = workload.training.gradient_checkpointing
    # At the first block's backward its activations are live: saved ones, or recomputed under
    # gradient checkpointing; either way one block's worth, with nearly every gradient present.
    last_block = acts.one_block
    dequant = states.largest_weight_bytes + states.gathered_layer_bytes
    # DoRA's weight norm (dora.py) follows its layer's own dequantization, which is freed by then;
    # backward builds it again only when checkpointing recomputes the forward
    layer_transient = max(dequant, dora_transient_bytes(model, setup, workload) + states.gathered_layer_bytes)
    backward_transient = layer_transient if gc else dequant
    phases: dict[str, dict[str, int]] = {
        "forward": {**static, "gradients": grads_in_forward, "activations": acts.saved,
                    "logits_and_loss": logits_fwd, "autocast_weight_cache": copies.forward, "transient": dequant},
        # inside the last block's forward, before the logits exist: DoRA's weight norm (dora.py)
        "forward_last_block": {**static, "gradients": grads_in_forward, "activations": acts.saved, "logits_and_loss": 0,
                               "autocast_weight_cache": copies.forward, "transient": layer_transient},
        "backward": {**static, "gradients": max(grads_in_forward, _head_gradient(model, setup, states)),
                     "activations": acts.saved, "logits_and_loss": logits_bwd,
                     "autocast_weight_cache": copies.backward, "transient": dequant},
        # with checkpointing, the last block is recomputed while every checkpoint is still held
        "backward_first_block": {**static, "gradients": max(grads_in_forward, _head_gradient(model, setup, states)),
                                 "activations": acts.saved + (acts.one_block if gc else 0) + _hidden_grad(model, setup, workload),
                                 "logits_and_loss": 0, "autocast_weight_cache": copies.backward, "transient": backward_transient},
        "backward_end": {**static, "gradients": states.gradients, "activations": last_block + _hidden_grad(model, setup, workload),
                         "logits_and_loss": 0, "autocast_weight_cache": 0, "transient": backward_transient + _tied_gradient(model, setup, states)},
        "optimizer": {**static, "gradients": states.gradients, "activations": 0, "logits_and_loss": 0,
                      "autocast_weight_cache": 0, "transient": states.optimizer_step_temporary},
    }
    return _pick(phases, long_lived=sum(static.values()) + states.gradients)


def _head_gradient(model: ResolvedModel, setup: Setup, states: StateBytes) -> int:
    """The first gradient backward produces is the output head's (full fine-tuning)."""
    if not setup.full_trainable or model.arch is None:
        return 0
    head = [m for m in model.modules if m.kind is ModuleKind.head] or [m for m in model.modules if m.kind is ModuleKind.embedding]
    numel = sum(m.numel for m in head[:1])
    return tensor_bytes(numel, DType.float32 if setup.precision is Precision.amp else setup.weight_dtype)


def _tied_gradient(model: ResolvedModel, setup: Setup, states: StateBytes) -> int:
    """A tied embedding gets two gradients, the head's first and the embedding's last; autograd
    adds them, so both are live at the end of backward (torch/csrc/autograd/input_buffer.cpp)."""
    arch = model.arch
    if not setup.full_trainable or arch is None or not arch.tie_word_embeddings or arch.kind is Kind.encoder:
        return 0
    numel = arch.vocab_size * arch.hidden_size // setup.tensor_parallel
    grad_dtype = DType.float32 if setup.precision is Precision.amp else setup.weight_dtype
    return tensor_bytes(numel, grad_dtype) if states.gradients else 0


def _hidden_grad(model: ResolvedModel, setup: Setup, workload: Workload) -> int:
    """Gradient of the hidden states flowing between blocks (two alive at a block boundary)."""
    if model.arch is None:
        return 0
    return 2 * tensor_bytes(tokens_per_micro_batch(workload) * model.arch.hidden_size, setup.residual_dtype)


def _pick(phases: dict[str, dict[str, int]], long_lived: int) -> PhasePeaks:
    totals = {name: sum(terms.values()) for name, terms in phases.items()}
    peak_phase = max(totals, key=lambda name: totals[name])
    terms = {name: value for name, value in phases[peak_phase].items()}
    forward = [name for name in totals if name.startswith("forward")]
    backward = [name for name in totals if name.startswith("backward")]
    by_phase = {"forward": max(totals[name] for name in forward), "backward": max(totals[name] for name in backward),
                "optimizer": totals["optimizer"]}
    label = "backward" if peak_phase in backward else "forward" if peak_phase in forward else peak_phase
    peak = totals[peak_phase]
    return PhasePeaks(peak_bytes=peak, peak_phase=label, terms=terms, by_phase=by_phase, transient_bytes=max(peak - long_lived, 0))


def _inference_peaks(model: ResolvedModel, setup: Setup, workload: Workload, states: StateBytes) -> PhasePeaks:
    """Weights + KV cache for prompt + new tokens + one forward's activations (prefill)."""
    arch = model.arch
    inference = workload.inference
    static = _static_terms(states, model, setup, workload)
    if arch is None:
        return _pick_inference(static, static, sum(static.values()))
    # The cache holds keys and values in the hidden states' dtype: Linear4bit returns its output
    # in the input's dtype (bitsandbytes/nn/modules.py), not in bnb_4bit_compute_dtype.
    cache_dtype = inference.kv_cache_dtype or setup.residual_dtype
    tokens = inference.prompt_tokens + inference.max_new_tokens
    gpus = workload.hardware.num_gpus
    kv = kv_cache_bytes(arch, tokens, inference.batch_size, cache_dtype) // gpus
    prefill_tokens = inference.batch_size * inference.prompt_tokens
    acts = _prefill_activations(arch, setup, workload, prefill_tokens)
    logits = inference.batch_size * arch.vocab_size * FP32  # the last position's, in fp32 (rule transformers445_last_logits)
    prompt_kv = kv_cache_bytes(arch, inference.prompt_tokens, inference.batch_size, cache_dtype) // gpus
    prefill = {**static, "kv_cache": prompt_kv, "activations": acts, "logits_and_loss": logits, "transient": states.largest_weight_bytes}
    if not prefill_keeps_last_logits_only(workload.software):
        # After the last block, only the final hidden states remain; the head computes every prompt
        # position's logits in its dtype and their .float() copy, alive together.
        head = {**static, "kv_cache": prompt_kv, "activations": prefill_tokens * arch.hidden_size * int(dtype_bytes(setup.residual_dtype)) // gpus,
                "logits_and_loss": prefill_tokens * arch.vocab_size * (logits_dtype_bytes(setup) + FP32) // gpus, "transient": 0}
        prefill = max(prefill, head, key=lambda terms: sum(terms.values()))
    # the last step's tuples beside the new ones; a single new token comes from the prefill alone
    if holds_previous_cache_while_decoding(workload.software) and inference.max_new_tokens > 1:
        kv += kv_cache_bytes(arch, tokens - 1, inference.batch_size, cache_dtype) // gpus
    decode = {**static, "kv_cache": kv, "activations": 0, "logits_and_loss": logits, "transient": 0}
    return _pick_inference(prefill, decode, sum(static.values()))


def _pick_inference(prefill: dict[str, int], decode: dict[str, int], long_lived: int) -> PhasePeaks:
    totals = {"prefill": sum(prefill.values()), "decode": sum(decode.values())}
    phase = max(totals, key=lambda name: totals[name])
    chosen = prefill if phase == "prefill" else decode
    return PhasePeaks(peak_bytes=totals[phase], peak_phase=phase, terms=chosen, by_phase=totals,
                      transient_bytes=max(totals[phase] - long_lived, 0))


def _prefill_activations(arch: Architecture, setup: Setup, workload: Workload, tokens: int) -> int:
    """The widest moment of one block in a no-grad forward: the embeddings (``inputs_embeds`` stays
    referenced for the whole pass, modeling_llama.py LlamaModel.forward), the residual, the normed
    input and the MLP's intermediate tensors (two for a gated MLP, act(gate) x up), or eager
    attention's scores."""
    cb = dtype_bytes(setup.residual_dtype)
    width = arch.intermediate_size * (arch.num_experts_per_tok if arch.num_experts else 1)
    mlp = (3 if arch.gated_mlp else 2) * width
    if arch.hidden_act == "gelu_new":
        # gelu_new is written out in Python (transformers/activations.py NewGELUActivation):
        # 0.5 * x and the tanh(...) chain hold two more intermediate-sized tensors at once
        mlp += 2 * width
    per_token = 3 * arch.hidden_size + mlp
    scores = 0
    if setup.attention is AttnImplementation.eager:
        prompt = workload.inference.prompt_tokens
        scores = int(arch.num_heads * prompt * workload.inference.batch_size * prompt * (cb + 4))
    return int(max(per_token * tokens * cb, scores + 2 * arch.hidden_size * tokens * cb))
