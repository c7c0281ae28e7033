"""Weight formats beyond bitsandbytes, inference's KV cache, and the knobs that move memory."""

from __future__ import annotations

import pytest

from tests.conftest import run_estimate

LLAMA2_7B = {"id": "meta-llama/Llama-2-7b-hf", "dtype": "float16"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128}


def test_gptq_4bit_llama2_7b_weighs_about_3_9_gb(catalog):
    # TheBloke/Llama-2-7B-GPTQ, main branch (4-bit, group size 128): 3.90 GB of safetensors.
    result = run_estimate(catalog, {"model": LLAMA2_7B, "task": "inference", "quantization": GPTQ})
    stored = result.terms["weights"] + result.terms["quantization_constants"]
    assert stored / 1e9 == pytest.approx(3.90, rel=0.02)


def test_gptq_group_constants_follow_the_format():
    # Per linear: packed 4-bit weights, an fp16 scale and a packed 4-bit zero per group and column,
    # and an int32 g_idx per input feature (auto_gptq QuantLinear buffers).
    from app.estimator.params import Module, ModuleKind
    from app.estimator.states import quantized_weight_bytes
    from app.workload import Workload

    module = Module(name="q_proj", kind=ModuleKind.linear, in_features=4096, out_features=4096, weight_numel=4096 * 4096)
    workload = Workload.model_validate({"model": LLAMA2_7B, "quantization": GPTQ})
    packed, constants = quantized_weight_bytes(module, 4, workload)
    assert packed == 4096 * 4096 // 2
    assert constants == 4096 * 32 * 2 + 4096 * 32 // 2 + 4096 * 4


def test_qa_lora_merged_model_is_the_int4_model_alone(catalog):
    merged = run_estimate(catalog, {"model": LLAMA2_7B, "task": "inference", "quantization": GPTQ})
    with_adapter = run_estimate(catalog, {"model": LLAMA2_7B, "task": "inference", "quantization": GPTQ, "lora": {"r": 64}})
    assert merged.terms["lora_adapters"] == 0
    assert with_adapter.terms["lora_adapters"] > 0


def test_qlora_training_on_a_gptq_base_counts_adapters_gradients_and_states(catalog):
    result = run_estimate(catalog, {"model": LLAMA2_7B, "quantization": GPTQ, "lora": {"r": 16},
                                    "training": {"per_device_train_batch_size": 1, "max_seq_length": 512}})
    assert result.trainable_parameters > 0
    assert result.terms["optimizer_states"] > 0


def test_kv_cache_of_llama2_70b_uses_its_8_kv_heads(catalog):
    # 2 (K, V) x 80 layers x 8 kv heads x 128 head_dim x 4096 tokens x 2 bytes = 1.34 GB (GQA).
    result = run_estimate(catalog, {"model": {"id": "meta-llama/Llama-2-70b-hf", "dtype": "float16"}, "task": "inference",
                                    "inference": {"batch_size": 1, "prompt_tokens": 4096, "max_new_tokens": 0},
                                    "hardware": {"gpu": "H200"}})
    assert result.terms["kv_cache"] == 2 * 80 * 8 * 128 * 4096 * 2


def test_frozen_layers_reduce_trainable_parameters_and_memory(catalog):
    base = {"model": LLAMA2_7B, "training": {"per_device_train_batch_size": 1, "max_seq_length": 512, "bf16": True}}
    frozen = {**base, "training": {**base["training"], "frozen_layers": 16}}
    full = run_estimate(catalog, base)
    half = run_estimate(catalog, frozen)
    assert half.trainable_parameters < full.trainable_parameters
    assert half.peak_bytes < full.peak_bytes


def test_chunked_and_fused_losses_never_use_more_than_plain_cross_entropy(catalog):
    peaks = []
    for loss in ("cross_entropy", "chunked_cross_entropy", "fused_linear_cross_entropy"):
        result = run_estimate(catalog, {"model": {"id": "meta-llama/Llama-3.1-8B", "dtype": "bfloat16"},
                                        "lora": {"r": 16}, "training": {"per_device_train_batch_size": 4, "max_seq_length": 4096,
                                                                        "loss_implementation": loss}})
        peaks.append(result.allocated_peak_bytes)
    assert peaks[0] >= peaks[1] >= peaks[2]


def test_bf16_on_a_t4_is_warned(catalog):
    result = run_estimate(catalog, {"model": LLAMA2_7B, "lora": {"r": 8}, "training": {"bf16": True}, "hardware": {"gpu": "T4"}})
    assert any("does not support bf16" in warning for warning in result.warnings)


def test_flash_attention_2_on_a_v100_is_warned(catalog):
    result = run_estimate(catalog, {"model": LLAMA2_7B, "lora": {"r": 8}, "training": {"attn_implementation": "flash_attention_2", "fp16": True},
                                    "hardware": {"gpu": "V100"}})
    assert any("FlashAttention-2" in warning for warning in result.warnings)


def test_dora_with_lora_dropout_is_warned_and_costs_a_second_base_output(catalog):
    """peft DoraLinearVariant: with dropout the base output is computed again (and its weight kept)."""
    def dora(dropout: float):
        return run_estimate(catalog, {"model": {"id": "meta-llama/Llama-2-7b-hf", "dtype": "bfloat16"},
                                      "lora": {"r": 16, "target_modules": "all-linear", "use_dora": True, "lora_dropout": dropout},
                                      "training": {"max_seq_length": 512, "gradient_checkpointing": False, "bf16": True}})
    with_dropout, without = dora(0.05), dora(0.0)
    assert any("DoRA with lora_dropout > 0" in warning for warning in with_dropout.warnings)
    assert not any("DoRA" in warning for warning in without.warnings)
    # every adapted layer keeps a bf16 copy of its weight: about the model's 13 GB of linear weights
    assert with_dropout.terms["activations"] - without.terms["activations"] > 12 * 10**9


def test_a_model_too_large_for_any_gpu_is_warned(catalog):
    result = run_estimate(catalog, {"model": {"id": "meta-llama/Llama-3.1-405B", "dtype": "float32"}, "training": {"bf16": True}})
    assert any("more than any GPU" in warning for warning in result.warnings)


def test_paged_optimizer_overflow_is_reported_as_fits_with_paging(catalog):
    # 33B QLoRA with paged 32-bit AdamW on a 24 GB card: as the batch grows, there is a range where
    # only the paged optimizer states overflow (they spill to CPU memory) before nothing fits.
    def verdict(batch: int):
        return run_estimate(catalog, {
            "model": {"id": "huggyllama/llama-30b", "dtype": "bfloat16"},
            "quantization": {"load_in_4bit": True, "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"},
            "lora": {"r": 64, "target_modules": "all-linear", "adapter_dtype": "float32"},
            "training": {"per_device_train_batch_size": batch, "max_seq_length": 512, "optim": "paged_adamw_32bit", "bf16": True},
            "hardware": {"gpu": "nvidia-rtx-3090-24gb"}})

    results = [verdict(batch) for batch in range(1, 9)]
    paging = [r for r in results if r.verdict == "fits_with_paging"]
    assert paging, [r.verdict for r in results]
    for result in paging:
        assert result.peak_bytes - result.paged_bytes <= result.usable_bytes < result.peak_bytes
        assert any("paged optimizer" in warning for warning in result.warnings)


def test_transformers_4_honours_t5_untied_head(catalog):
    v5 = run_estimate(catalog, {"model": {"id": "google/flan-t5-xxl"}, "task": "inference"})
    v4 = run_estimate(catalog, {"model": {"id": "google/flan-t5-xxl"}, "task": "inference", "software": {"transformers": "4.46"}})
    assert v4.num_parameters - v5.num_parameters == 32128 * 4096
    assert v4.num_parameters == 11_135_332_352  # the published flan-t5-xxl total (untied lm_head)


def test_inference_split_over_gpus_divides_weights_and_cache(catalog):
    # accelerate's device_map="auto" places whole blocks on each GPU: per-GPU weights and cache shrink.
    one = run_estimate(catalog, {"model": {"id": "meta-llama/Llama-2-70b-hf", "dtype": "float16"}, "task": "inference", "hardware": {"gpu": "H200"}})
    two = run_estimate(catalog, {"model": {"id": "meta-llama/Llama-2-70b-hf", "dtype": "float16"}, "task": "inference",
                                 "hardware": {"gpu": "H100", "num_gpus": 2}})
    assert two.terms["weights"] == pytest.approx(one.terms["weights"] / 2, rel=1e-6)
    assert two.terms["kv_cache"] == pytest.approx(one.terms["kv_cache"] / 2, rel=1e-6)


@pytest.mark.parametrize(
    ("peft", "expected_trainable"),
    [
        # IA3 on Llama-2-7B: k_proj and v_proj vectors of 4096, down_proj (feed-forward) of 11008, x 32 layers.
        ({"peft_type": "IA3"}, 32 * (4096 + 4096 + 11008)),
        # Prompt tuning: 20 virtual tokens x 4096.
        ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 20}, 20 * 4096),
        # P-tuning: 20 virtual tokens x 4096 and the MLP prompt encoder's three 4096 x 4096 layers with biases
        # (peft PromptEncoder; PEFT MetaMathQA's Llama-3.2-3B P-tuning run records 20 x 3072 + 3 x (3072^2 + 3072)).
        ({"peft_type": "P_TUNING", "num_virtual_tokens": 20}, 20 * 4096 + 3 * (4096 * 4096 + 4096)),
        # LN tuning: the 65 RMSNorm weights of 4096.
        ({"peft_type": "LN_TUNING"}, 65 * 4096),
    ],
)
def test_other_peft_methods_train_their_own_parameters(catalog, peft, expected_trainable):
    result = run_estimate(catalog, {"model": LLAMA2_7B, "peft": peft, "training": {"per_device_train_batch_size": 1, "max_seq_length": 512}})
    assert result.trainable_parameters == expected_trainable
    assert result.terms["lora_adapters"] == 4 * expected_trainable


def test_lora_and_peft_blocks_are_exclusive():
    from pydantic import ValidationError

    from app.workload import Workload

    with pytest.raises(ValidationError, match="not both"):
        Workload.model_validate({"model": LLAMA2_7B, "lora": {}, "peft": {"peft_type": "IA3"}})


@pytest.mark.parametrize(("bf16", "log_prob_bytes"), [(False, 2), (True, 4)])
def test_transformers_4_gpt_style_loss_keeps_log_probabilities_in_the_logits_dtype_without_autocast(catalog, bf16, log_prob_bytes):
    """transformers 4.48 GPTBigCodeForCausalLM: ``CrossEntropyLoss()`` on the raw 16-bit logits. Without
    autocast log_softmax returns bf16; under autocast (its fp32 list) fp32. Backward starts with three
    logit-sized tensors of that size."""
    from app.estimator.logits import logits_buffers
    from app.estimator.model import resolve_model
    from app.estimator.setup import resolve_setup
    from app.workload import Workload

    config = {"model_type": "gpt_bigcode", "n_embd": 256, "n_layer": 2, "n_head": 4, "multi_query": True, "vocab_size": 1000}
    workload = Workload.model_validate({"model": {"config": config, "dtype": "bfloat16"}, "software": {"transformers": "4.48.1"},
                                        "training": {"per_device_train_batch_size": 2, "max_seq_length": 64, "bf16": bf16}})
    model = resolve_model(workload.model, catalog, workload.software)
    setup = resolve_setup(workload, model.arch, model.modules, catalog.gpu("A100-80GB"))
    logits = 2 * 64 * 1000
    forward, backward = logits_buffers(model.arch, setup, workload)
    assert (forward, backward) == (logits * (2 * 2 + log_prob_bytes), logits * 3 * log_prob_bytes)


QWEN2_05B_LIKE = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                  "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768, "tie_word_embeddings": True}


def _qwen2_inference(catalog, transformers: str, prompt: int):
    return run_estimate(catalog, {"model": {"config": QWEN2_05B_LIKE, "dtype": "bfloat16"}, "task": "inference",
                                  "inference": {"batch_size": 1, "prompt_tokens": prompt, "max_new_tokens": 16},
                                  "software": {"transformers": transformers}})


def test_transformers_before_4_45_keeps_rotary_tables_in_every_qwen2_layer(catalog):
    """modeling_qwen2.py 4.37-4.44: each attention layer's Qwen2RotaryEmbedding registers cos_cached and
    sin_cached of max_position_embeddings x head_dim in the load dtype; 4.45 computes them on the fly."""
    old, new = _qwen2_inference(catalog, "4.38.2", 1), _qwen2_inference(catalog, "4.45.0", 1)
    assert old.terms["rotary_caches"] == 24 * 2 * 32768 * 64 * 2
    assert "rotary_caches" not in new.terms


def test_transformers_before_4_45_computes_every_prompt_positions_logits_at_prefill(catalog):
    """4.38-4.44: ``logits = self.lm_head(hidden_states); logits = logits.float()`` over the whole prompt;
    4.45: generate passes num_logits_to_keep=1."""
    old, new = _qwen2_inference(catalog, "4.44.2", 4096), _qwen2_inference(catalog, "4.45.0", 4096)
    assert old.peak_phase == "prefill" and old.terms["logits_and_loss"] == 4096 * 151936 * (2 + 4)
    assert new.terms["logits_and_loss"] == 151936 * 4


@pytest.mark.parametrize("new_tokens", [64, 1])
def test_transformers_before_4_36_holds_two_caches_at_the_end_of_a_decoding_step(catalog, new_tokens):
    """4.35: each layer returns ``torch.cat([past_key_value[0], key_states])`` while generate still holds
    the previous tuples; 4.36's DynamicCache replaces them in place. One new token needs no decoding step."""
    from app.estimator.logits import kv_cache_bytes
    from app.estimator.model import resolve_model
    from app.workload import DType, Workload

    def decode_bytes(transformers: str) -> tuple[int, Workload]:
        data = {"model": {"id": "meta-llama/Llama-2-7b-hf", "dtype": "float16"}, "task": "inference",
                "inference": {"batch_size": 8, "prompt_tokens": 2048, "max_new_tokens": new_tokens}, "software": {"transformers": transformers}}
        return run_estimate(catalog, data).phase_peaks["decode"], Workload.model_validate(data)

    (old, workload), (new, _) = decode_bytes("4.35.2"), decode_bytes("4.36.2")
    arch = resolve_model(workload.model, catalog).arch
    previous = kv_cache_bytes(arch, 2048 + new_tokens - 1, 8, DType.float16) if new_tokens > 1 else 0
    assert old - new == previous


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_deepspeed_step_holds_a_16_bit_flat_copy_and_an_fp32_copy_of_the_gradient_partition(catalog, strategy):
    """deepspeed 0.14 stage_1_and_2.py step / stage3.py _prepare_fp32_grad_for_sub_group:
    ``self.flatten(self.averaged_gradients[i]).to(fp32)``: 2 + 4 bytes per parameter of the partition."""
    from app.estimator.model import resolve_model
    from app.estimator.setup import resolve_setup
    from app.estimator.sharding import per_gpu_states
    from app.workload import Workload

    workload = Workload.model_validate({"model": {"id": "meta-llama/Llama-2-7b-hf", "dtype": "bfloat16"}, "training": {"bf16": True},
                                        "hardware": {"gpu": "A100-80GB", "num_gpus": 4}, "distributed": {"strategy": strategy}})
    model = resolve_model(workload.model, catalog)
    states = per_gpu_states(model, resolve_setup(workload, model.arch, model.modules, catalog.gpu("A100-80GB")), workload)
    partition = -(-states.counts.trainable // 4)
    assert states.optimizer_step_temporary == partition * (2 + 4)
