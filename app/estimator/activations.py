"""Activations that one transformer block saves for backward during training.

A block is written family by family as transformers 5.24 runs it (blocks.py, blocks_moe.py,
blocks_t5.py) over operators whose saving rules are torch 2.13's on a CUDA GPU (blocks_ops.py):
which inputs or results each backward formula keeps, CUDA's autocast casts, the kernels SDPA
picks (flash, memory-efficient, math), PEFT's LoRA branch and its input casts. Every storage is
counted once, however many operators keep it. tests/estimator/test_activations_autograd.py runs
a small model of every family under ``torch.autograd.graph.saved_tensors_hooks`` and checks the
bytes per block exactly.

The estimate is for a run as HF Trainer makes it: ``use_cache=False``, unpadded batches (no
attention mask, so SDPA's flash kernel and GQA without ``repeat_kv``), autocast when bf16/fp16 is
on. Left out: kernel scratch space, allocator rounding (overhead.py), autocast's cache of 16-bit
copies of trained fp32 weights (phases.py), and tensors that all blocks share (rotary cos/sin, the
causal mask, the encoder output, T5's cross-attention position bias).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from pydantic import BaseModel, ConfigDict

from app.estimator.architecture import LLAMA_LIKE, Architecture, Kind
from app.estimator.blocks import (
    bert_block,
    bloom_block,
    falcon_block,
    gpt2_block,
    gpt_neox_block,
    llama_block,
    opt_block,
    phi_block,
)
from app.estimator.blocks_moe import moe_block
from app.estimator.blocks_ops import FP32, Axis, Ia3Rules, LoraRules, Part, Rules, Tape, Tensor
from app.estimator.blocks_t5 import t5_decoder_block, t5_encoder_block
from app.estimator.params import Module
from app.estimator.peft_methods import ia3_module_names, prefix_tokens
from app.estimator.setup import Precision, Setup, lora_casts_input
from app.units import dtype_bytes
from app.workload import AttnImplementation, PeftType, Workload


class LayerActivations(BaseModel):
    """Bytes one block saves, by what they scale with.

    Per token of the block's own sequence, by part: ``norms``, ``attention``, ``mlp``, ``lora``,
    ``dropout`` (masks); ``attention_scores_per_key``: per token and key (eager attention).
    Encoder-decoder cross-attention: ``per_memory_token`` (keys and values of the encoder output),
    ``attention_scores_per_memory_key``. ``position_bias_per_pair``: per query and key position,
    shared by the batch (T5's position-bias masks). ``constant_bytes``: per block (per-call
    copies of small weights, saved index tensors).
    """

    model_config = ConfigDict(frozen=True)

    norms: float
    attention: float
    attention_scores_per_key: float  # multiplied by the key length (eager attention only)
    mlp: float
    lora: float
    dropout: float
    per_memory_token: float = 0.0
    attention_scores_per_memory_key: float = 0.0
    position_bias_per_pair: float = 0.0
    constant_bytes: float = 0.0
    output_size: int = 0  # bytes per element of the block's output (fp32 after a post-norm under autocast)
    kept_under_checkpointing: float = 0.0  # bytes per token saved outside autograd's hooks (bitsandbytes 8-bit)

    def per_token(self, seq_len: int) -> float:
        """Bytes per token (``block_bytes`` adds the terms that do not scale with tokens)."""
        return self.norms + self.attention + self.attention_scores_per_key * seq_len + self.mlp + self.lora + self.dropout

    def block_bytes(self, batch_size: int, seq_len: int, memory_len: int = 0) -> int:
        """All bytes the block saves for a micro-batch (``memory_len``: encoder length, decoders)."""
        tokens = batch_size * seq_len
        total = (
            self.per_token(seq_len) * tokens
            + self.attention_scores_per_memory_key * tokens * memory_len
            + self.per_memory_token * batch_size * memory_len
            + self.position_bias_per_pair * seq_len * seq_len
            + self.constant_bytes
        )
        return int(total)


BlockFunction = Callable[[Tape, Architecture, Tensor], Tensor]

_BLOCKS: dict[str, BlockFunction] = {
    **{family: llama_block for family in LLAMA_LIKE},
    "gpt2": gpt2_block,
    "gpt_bigcode": gpt2_block,
    "bert": bert_block,
    "falcon": falcon_block,
    "opt": opt_block,
    "bloom": bloom_block,
    "gpt_neox": gpt_neox_block,
    "phi": phi_block,
    "t5": t5_encoder_block,
    "mt5": t5_encoder_block,
}


def block_activations(
    arch: Architecture, modules: list[Module], setup: Setup, workload: Workload, trainable: bool, *, decoder: bool = False
) -> LayerActivations:
    """Saved bytes of one block during training (``decoder``: a decoder block of an
    encoder-decoder model, with cross-attention over the encoder output)."""
    return _traced_block(arch, _rules(arch, modules, setup, workload, trainable), int(dtype_bytes(setup.residual_dtype)), decoder)


@lru_cache(maxsize=1024)
def _traced_block(arch: Architecture, rules: Rules, residual_size: int, decoder: bool) -> LayerActivations:
    """The block's trace, memoized: a pure function of hashable, frozen inputs, and the costliest part
    of an estimate (the planner and repeated API calls trace the same block many times)."""
    tape = _trace(arch, rules, residual_size, decoder)
    if tape.output_size != residual_size:  # a block's input is the previous block's output (fp32 LayerNorm output under autocast)
        tape = _trace(arch, rules, tape.output_size, decoder)
    return _summarize(tape)


traced_block_cache_clear = _traced_block.cache_clear


def _trace(arch: Architecture, rules: Rules, input_size: int, decoder: bool) -> Tape:
    tape = Tape(rules)
    x = tape.new(arch.hidden_size, input_size)
    if decoder and arch.kind is Kind.encoder_decoder:
        out = t5_decoder_block(tape, arch, x, tape.shared(arch.hidden_size, input_size, axis=Axis.memory))
    elif arch.num_experts:
        out = llama_block(tape, arch, x, moe_block)
    else:
        out = _BLOCKS[arch.family](tape, arch, x)
    tape.output_size = out.size
    return tape


def _rules(arch: Architecture, modules: list[Module], setup: Setup, workload: Workload, trainable: bool) -> Rules:
    lora = workload.lora
    lora_rules = None
    if lora is not None and setup.lora_targets:
        lora_rules = LoraRules(
            targets=setup.lora_targets + _peft_moe_targets(arch, workload),
            rank=lora.r,
            adapter_size=int(dtype_bytes(lora.adapter_dtype)),
            dropout=lora.lora_dropout,
            cast_input=lora_casts_input(setup),
            dora=lora.use_dora,
        )
    weight_size, linear_weight_size = _weight_sizes(setup)
    peft = workload.peft
    ia3 = None
    if peft is not None and peft.peft_type is PeftType.IA3:
        ia3 = Ia3Rules(*ia3_module_names(peft, arch, modules))
    return Rules(
        compute_size=int(dtype_bytes(setup.compute_dtype)),
        autocast=setup.autocast is not None,
        trainable=trainable,
        weight_size=weight_size,
        linear_weight_size=linear_weight_size,
        lora=lora_rules,
        sdpa=setup.attention is not AttnImplementation.eager,
        flash_package=setup.attention.value.startswith("flash_attention"),
        batch_one=workload.training.per_device_train_batch_size == 1,
        attention_dropout=arch.attention_dropout,
        bnb_bits=_bnb_bits(workload, setup),
        ia3=ia3,
        norms_train=peft is not None and peft.peft_type is PeftType.LN_TUNING,
        prefix_tokens=prefix_tokens(peft),
    )


def _bnb_bits(workload: Workload, setup: Setup) -> int:
    quant = workload.quantization
    if quant is None or quant.quant_method != "bitsandbytes" or not setup.bnb_quantizes_linears:
        return 0
    return setup.quant_bits or 0


def _weight_sizes(setup: Setup) -> tuple[int, float]:
    """Bytes per element of the unquantized weights (norms, routers) and of the linear layers'
    weights: fp32 under AMP; a quantized base keeps the rest in its load dtype, or in fp32 after
    ``prepare_model_for_kbit_training``."""
    if setup.precision in (Precision.amp, Precision.fp32):
        return FP32, FP32
    load = int(dtype_bytes(setup.weight_dtype))
    if setup.precision is Precision.quantized:
        return (FP32 if setup.kbit_prepared else load), (setup.quant_bits or 16) / 8
    return load, load


def _peft_moe_targets(arch: Architecture, workload: Workload) -> tuple[str, ...]:
    """What PEFT's ``all-linear`` adapts beyond the linear modules params.py lists: Qwen2-MoE's
    ``shared_expert_gate`` (an nn.Linear), Mixtral's router and fused experts (converted to
    ``target_parameters`` for transformers 5, peft/utils/transformers_weight_conversion.py)."""
    if workload.lora is None or workload.lora.target_modules != "all-linear":
        return ()
    if arch.family == "qwen2_moe" and arch.shared_expert_intermediate_size:
        return ("shared_expert_gate",)
    if arch.family == "mixtral" and arch.fused_experts:
        return ("gate", "experts")
    return ()


def _summarize(tape: Tape) -> LayerActivations:
    totals = tape.totals()

    def per(axis: Axis, part: Part | None = None) -> float:
        return sum(v for (p, a), v in totals.items() if a is axis and (part is None or p is part))

    return LayerActivations(
        norms=per(Axis.token, Part.norms),
        attention=per(Axis.token, Part.attention),
        attention_scores_per_key=per(Axis.key),
        mlp=per(Axis.token, Part.mlp),
        lora=per(Axis.token, Part.lora),
        dropout=per(Axis.token, Part.dropout),
        per_memory_token=per(Axis.memory),
        attention_scores_per_memory_key=per(Axis.memory_key),
        position_bias_per_pair=per(Axis.pair),
        constant_bytes=sum(tape.constant.values()),
        output_size=tape.output_size,
        kept_under_checkpointing=tape.unhooked_per_token(),
    )
