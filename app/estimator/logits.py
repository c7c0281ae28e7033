"""Tokens per micro-batch, logits and loss buffers, and the KV cache."""

from __future__ import annotations

from app.estimator.architecture import Architecture, Kind
from app.estimator.peft_methods import extra_tokens
from app.estimator.setup import Setup
from app.estimator.versions import copies_shifted_logits
from app.units import DType, dtype_bytes
from app.workload import LossImplementation, Workload

FP32 = 4
# Liger/torchtune chunked losses materialize logits for a chunk of tokens at a time.
CHUNKED_LOSS_CHUNKS = 8  # torchtune CEWithChunkedOutputLoss num_output_chunks=8
# Fused linear cross-entropy (Liger) works on chunks of tokens; its buffers are bounded by one
# chunk's logits and their gradient (liger_kernel/ops/fused_linear_cross_entropy.py).
FUSED_LOSS_CHUNK_TOKENS = 1024


def tokens_per_micro_batch(workload: Workload) -> int:
    """Tokens of one micro-batch, virtual prompt tokens included."""
    training = workload.training
    return training.per_device_train_batch_size * (training.max_seq_length + extra_tokens(workload.peft))


def decoder_tokens(arch: Architecture, workload: Workload) -> int:
    """Tokens in the decoder stack (encoder-decoder: the target length)."""
    training = workload.training
    if arch.kind is Kind.encoder_decoder:
        return training.per_device_train_batch_size * (training.max_target_length or training.max_seq_length)
    return tokens_per_micro_batch(workload)


def logits_dtype_bytes(setup: Setup) -> int:
    """Bytes per logit out of the head: the autocast dtype under Trainer's mixed precision, else
    the dtype of the head's input (fp32 after prepare_model_for_kbit_training)."""
    if setup.autocast is not None:
        return int(dtype_bytes(setup.autocast))
    return int(dtype_bytes(DType.float32 if setup.kbit_prepared else setup.compute_dtype))


def logits_buffers(arch: Architecture, setup: Setup, workload: Workload) -> tuple[int, int]:
    """(bytes live at the loss in forward, bytes live at the start of backward) for logits and loss.

    transformers 5.24 ForCausalLMLoss (transformers/loss/loss_utils.py) upcasts the logits with
    ``logits.float()`` and shifts the labels, not the logits; cross_entropy saves its fp32
    log_softmax output. Under Trainer's mixed precision, accelerate converts the outputs to fp32
    (convert_outputs_to_fp32), another fp32 copy of the logits that lives until the loss is taken.
    Forward peak: 16-bit logits + an fp32 copy + the log-probabilities. Backward starts with the
    saved log-probabilities, the fp32 gradient of the loss w.r.t. them (nll_loss_backward) and the
    fp32 gradient of the logits (log_softmax_backward): 12 bytes per logit.
    transformers 4.x: see ``_transformers4_buffers``. Encoders have no vocabulary-sized logits.
    """
    if arch.kind is Kind.encoder:
        return 0, 0
    tokens = decoder_tokens(arch, workload)
    impl = workload.training.loss_implementation
    if impl is LossImplementation.fused_linear_cross_entropy:
        chunk = min(tokens, FUSED_LOSS_CHUNK_TOKENS)
        return chunk * arch.vocab_size * FP32 * 2, chunk * arch.vocab_size * FP32 * 2
    if impl is LossImplementation.chunked_cross_entropy:
        tokens = -(-tokens // CHUNKED_LOSS_CHUNKS)
    logits = tokens * arch.vocab_size
    lb = logits_dtype_bytes(setup)
    if copies_shifted_logits(workload.software):
        return _transformers4_buffers(arch, logits, lb, autocast=setup.autocast is not None)
    forward = logits * ((lb + FP32 + FP32) if lb != FP32 else (FP32 + FP32))
    backward = logits * 3 * FP32
    if arch.final_logit_softcapping:
        # Gemma-2 caps the logits, tanh(logits / cap) * cap (modeling_gemma2.py): tanh keeps its
        # output for backward beside the capped logits
        forward += logits * lb
        backward += logits * lb
    return forward, backward


# transformers 4.x families that computed CrossEntropyLoss on the raw (not upcast) logits in their
# own forward (models/gpt2/modeling_gpt2.py etc. in 4.48); llama-like ones used ForCausalLMLoss.
RAW_LOGITS_LOSS_FAMILIES = {"gpt2", "gpt_bigcode", "falcon", "opt", "bloom", "gpt_neox"}


def _transformers4_buffers(arch: Architecture, logits: int, lb: int, *, autocast: bool) -> tuple[int, int]:
    """Rule transformers4_logits. ForCausalLMLoss (4.46-4.57): 16-bit logits, ``.float()``, a
    contiguous shifted copy and the log-probabilities. GPT-2-style families (4.48.1
    modeling_gpt_bigcode.py: ``CrossEntropyLoss()(shift_logits.view(...), ...)`` on the raw logits):
    the logits, a shifted contiguous copy in the logits' dtype and the log-probabilities, in fp32
    under autocast (log_softmax is on its fp32 list), else in the logits' dtype. Backward: the
    log-probabilities, their gradient and the logits' gradient, in that same dtype."""
    if arch.family in RAW_LOGITS_LOSS_FAMILIES:
        log_probs = FP32 if autocast else lb
        return logits * (2 * lb + log_probs), logits * 3 * log_probs
    upcast = FP32 if lb != FP32 else 0
    return logits * (lb + upcast + FP32 + FP32), logits * 3 * FP32


def kv_cache_bytes(arch: Architecture, tokens: int, batch: int, dtype: DType) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x tokens x bytes (DynamicCache; sliding-window
    layers keep at most the window, transformers cache_utils.py DynamicSlidingWindowLayer)."""
    kept = min(tokens, arch.sliding_window) if arch.sliding_window else tokens
    layers = arch.num_decoder_layers if arch.kind is Kind.encoder_decoder else arch.num_layers
    return int(2 * layers * arch.kv_dim * kept * batch * dtype_bytes(dtype))
