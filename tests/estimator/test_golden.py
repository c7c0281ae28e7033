"""Golden figures from the literature: the textbook arithmetic must come out exactly."""

from __future__ import annotations

import pytest

from tests.conftest import QLORA_REPO, run_estimate

FP32_FULL = {"optim": "adamw_torch", "bf16": False, "fp16": False}


def test_7b_fp32_adamw_model_states_are_112_gb(catalog):
    # Textbook: 7e9 params x (4 weights + 4 gradients + 8 Adam moments) = 28 + 28 + 56 = 112 GB.
    result = run_estimate(catalog, {"model": {"num_parameters": 7_000_000_000, "dtype": "float32"}, "training": FP32_FULL})
    assert result.terms["weights"] == 28_000_000_000
    assert result.model_state_bytes == 112_000_000_000


def test_7b_16bit_adamw_model_states_are_56_gb(catalog):
    # 16-bit weights, gradients and torch AdamW states (zeros_like(param): 16-bit): 14 + 14 + 28 GB.
    result = run_estimate(catalog, {"model": {"num_parameters": 7_000_000_000, "dtype": "bfloat16"}, "training": {"optim": "adamw_torch"}})
    assert result.model_state_bytes == 56_000_000_000


def test_7b_int8_model_states_are_28_gb(catalog):
    # Textbook "int8": 1-byte weights, gradients and two 1-byte moments: 7 + 7 + 14 GB.
    result = run_estimate(catalog, {"model": {"num_parameters": 7_000_000_000, "dtype": "int8"}, "training": {"optim": "adamw_torch"}})
    assert result.model_state_bytes == 28_000_000_000


def test_65b_16bit_weights_are_130_gb(catalog):
    result = run_estimate(catalog, {"model": {"num_parameters": 65_000_000_000, "dtype": "float16"}, "task": "inference"})
    assert result.terms["weights"] == 130_000_000_000


def _nf4_constant_bits_per_param(catalog, double_quant: bool) -> float:
    numel = 4096 * 4096 * 64  # one large weight: block counts divide exactly
    quant = {"load_in_4bit": True, "bnb_4bit_use_double_quant": double_quant}
    result = run_estimate(catalog, {"model": {"num_parameters": numel, "dtype": "bfloat16"}, "task": "inference", "quantization": quant})
    return result.terms["quantization_constants"] * 8 / numel


def test_nf4_constants_cost_half_a_bit_per_parameter(catalog):
    # QLoRA paper (arXiv:2305.14314) s.3: 32-bit absmax per 64 weights = 32/64 = 0.5 bit/param.
    assert _nf4_constant_bits_per_param(catalog, double_quant=False) == pytest.approx(0.5, abs=1e-9)


def test_double_quantization_cuts_constants_to_0_127_bit_per_parameter(catalog):
    # QLoRA paper s.3: 8/64 + 32/(64*256) = 0.127 bit/param.
    assert _nf4_constant_bits_per_param(catalog, double_quant=True) == pytest.approx(8 / 64 + 32 / (64 * 256), abs=1e-9)
    assert round(_nf4_constant_bits_per_param(catalog, double_quant=True), 3) == 0.127


ZERO_PARAMS = 7_500_000_000  # ZeRO paper (arXiv:1910.02054) figure 1: 7.5B params, 64 GPUs, K=12


@pytest.mark.parametrize(
    ("strategy", "expected_gb"),
    [
        ("ddp", 120.0),  # 16 x 7.5e9 = 120 GB: baseline DDP (fp32 weights, fp16 autocast)
        ("zero1", 31.4),  # 2 + 2 + 12/64 bytes/param
        ("zero2", 16.6),  # 2 + (2 + 12)/64
        ("zero3", 1.9),  # 16/64
    ],
)
def test_zero_paper_per_gpu_model_states(catalog, strategy, expected_gb):
    result = run_estimate(
        catalog,
        {"model": {"num_parameters": ZERO_PARAMS, "dtype": "float32"}, "training": {"optim": "adamw_torch", "fp16": True},
         "hardware": {"gpu": "A100-80GB", "num_gpus": 64}, "distributed": {"strategy": strategy}},
    )
    assert result.model_state_bytes / 1e9 == pytest.approx(expected_gb, abs=0.05)


def test_zero_paper_mixed_precision_adam_is_16_bytes_per_param(catalog):
    result = run_estimate(catalog, {"model": {"num_parameters": ZERO_PARAMS, "dtype": "float16"},
                                    "training": {"optim": "adamw_torch", "fp16": True},
                                    "hardware": {"num_gpus": 2}, "distributed": {"strategy": "zero1"}})
    assert result.terms["master_weights"] == 4 * ZERO_PARAMS // 2


def test_mixed_precision_with_fp32_weights_is_16_bytes_per_param(catalog):
    # fp32 weights (the master copy) + fp32 gradients + fp32 Adam moments under bf16 autocast.
    result = run_estimate(catalog, {"model": {"num_parameters": 1_000_000_000, "dtype": "float32"}, "training": {"optim": "adamw_torch", "bf16": True}})
    assert result.model_state_bytes == 16_000_000_000


def test_65b_16bit_finetuning_with_fp32_adam_needs_about_780_gb(catalog):
    # QLoRA paper abstract: "regular 16-bit finetuning of a LLaMA 65B parameter model requires more
    # than 780 GB of GPU memory": 16-bit weights and gradients + fp32 Adam moments = 12 bytes/param.
    result = run_estimate(catalog, {"model": {"id": "huggyllama/llama-65b", "dtype": "bfloat16"},
                                    "training": {"optim": "paged_adamw_32bit", "bf16": True}})
    assert result.model_state_bytes == 12 * result.num_parameters
    assert result.model_state_bytes / 1e9 == pytest.approx(780, rel=0.01)


GPT3_CONFIG = {  # GPT-3 175B (Brown et al. 2020, table 2.1) as a GPT-2-style config
    "model_type": "gpt2", "n_embd": 12288, "n_layer": 96, "n_head": 96, "n_positions": 2048, "vocab_size": 50257,
}


def test_lora_paper_gpt3_175b_needs_about_350_gb(catalog):
    # LoRA paper (arXiv:2106.09685) s.4.2: with r=4 on the query and value projections, training
    # GPT-3 175B needs 350 GB, essentially its 16-bit weights.
    result = run_estimate(catalog, {"model": {"config": GPT3_CONFIG, "dtype": "float16"},
                                    "lora": {"r": 4, "target_modules": ["c_attn"], "adapter_dtype": "float16"},
                                    "training": {"optim": "adamw_torch", "fp16": True, "per_device_train_batch_size": 1}})
    assert result.terms["weights"] / 1e9 == pytest.approx(350, rel=0.01)
    assert result.model_state_bytes / 1e9 == pytest.approx(350, rel=0.01)


def test_qlora_paper_65b_fits_a_48gb_gpu(catalog):
    # QLoRA paper: "finetune a 65B parameter model on a single 48GB GPU" (repository settings).
    result = run_estimate(catalog, {"model": {"id": "huggyllama/llama-65b", "dtype": "bfloat16"}, **QLORA_REPO,
                                    "hardware": {"gpu": "nvidia-rtx-a6000-48gb"}})
    assert result.verdict in ("fits", "fits_with_paging")
    assert result.paged_bytes == result.terms["optimizer_states"] > 0


@pytest.mark.parametrize("gpu", ["nvidia-rtx-3090-24gb", "nvidia-rtx-4090-24gb"])
def test_qlora_paper_33b_fits_a_24gb_gpu(catalog, gpu):
    # QLoRA paper s.4 / Guanaco: 33B trains on a single 24 GB consumer GPU.
    result = run_estimate(catalog, {"model": {"id": "huggyllama/llama-30b", "dtype": "bfloat16"}, **QLORA_REPO, "hardware": {"gpu": gpu}})
    assert result.verdict in ("fits", "fits_with_paging")


def test_full_16bit_finetuning_of_llama2_7b_does_not_fit_a_t4(catalog):
    result = run_estimate(catalog, {"model": {"id": "meta-llama/Llama-2-7b-hf", "dtype": "float16"},
                                    "training": {"per_device_train_batch_size": 1, "max_seq_length": 512, "fp16": True, "optim": "adamw_torch"},
                                    "hardware": {"gpu": "T4"}})
    assert result.verdict == "does_not_fit"


def test_qlora_of_llama2_7b_at_batch_1_and_512_tokens_fits_a_t4(catalog):
    qlora = {**QLORA_REPO, "quantization": {**QLORA_REPO["quantization"], "bnb_4bit_compute_dtype": "float16"},
             "lora": {**QLORA_REPO["lora"], "adapter_dtype": "float16"},
             "training": {**QLORA_REPO["training"], "bf16": False, "fp16": True}}
    result = run_estimate(catalog, {"model": {"id": "meta-llama/Llama-2-7b-hf", "dtype": "float16"}, **qlora, "hardware": {"gpu": "T4"}})
    assert result.verdict == "fits"
    assert result.warnings == [] or all("bf16" not in w for w in result.warnings)


QWEN2_57B_A14B = {"model_type": "qwen2_moe", "hidden_size": 3584, "intermediate_size": 18944, "moe_intermediate_size": 2560,
                  "shared_expert_intermediate_size": 20480, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 28,
                  "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 151936, "tie_word_embeddings": False}


@pytest.mark.parametrize("transformers", ["4.40.1", "5.24.0"])
def test_qwen2_57b_a14b_has_57_4b_parameters_with_per_expert_or_fused_experts(transformers):
    """Qwen's model card: 57B total. transformers 4.x keeps a ModuleList of expert MLPs, 5.x fused
    tensors: the same parameters either way, shared expert included."""
    from app.estimator.architecture import read_architecture
    from app.estimator.params import list_modules

    arch = read_architecture(QWEN2_57B_A14B, transformers)
    assert sum(m.numel for m in list_modules(arch, QWEN2_57B_A14B)) == pytest.approx(57.41e9, rel=1e-3)
