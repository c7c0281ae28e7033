"""The calibration suite: workloads across families, methods, precisions, optimizers, gradient
checkpointing, attention kernels, batch sizes and sequence lengths (128 to 8192 tokens).

Each case is a plain Workload dict; ``fit.py`` simulates every case and compares the estimator.
"""

from __future__ import annotations

from typing import Any

QLORA_4BIT = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
              "bnb_4bit_compute_dtype": "bfloat16"}


def _case(name: str, model: str, method: str, *, batch: int = 1, seq: int = 512, gc: bool = True,
          optim: str = "adamw_torch_fused", dtype: str = "bfloat16", precision: str = "bf16",
          attn: str = "sdpa", r: int = 16, targets: Any = "all-linear", gpu: str = "nvidia-a100-80gb",
          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    training = {"per_device_train_batch_size": batch, "max_seq_length": seq, "gradient_checkpointing": gc,
                "optim": optim, "bf16": precision == "bf16", "fp16": precision == "fp16", "attn_implementation": attn}
    workload: dict[str, Any] = {"model": {"id": model, "dtype": dtype}, "training": training, "hardware": {"gpu": gpu}}
    if method in ("lora", "qlora", "int8-lora"):
        workload["lora"] = {"r": r, "lora_alpha": 2 * r, "target_modules": targets}
    if method == "qlora":
        workload["quantization"] = dict(QLORA_4BIT)
    if method == "int8-lora":
        workload["quantization"] = {"load_in_8bit": True}
    if method == "inference":
        workload = {"model": {"id": model, "dtype": dtype}, "task": "inference", "hardware": {"gpu": gpu},
                    "inference": {"batch_size": batch, "prompt_tokens": seq, "max_new_tokens": 64},
                    "training": {"attn_implementation": attn}}
    for block, values in (extra or {}).items():
        workload[block] = {**workload.get(block, {}), **values}
    return {"name": name, "workload": workload}


GPT2 = "openai-community/gpt2"
GPT2_MEDIUM = "openai-community/gpt2-medium"
BERT = "google-bert/bert-base-uncased"
LLAMA2 = "meta-llama/Llama-2-7b-hf"
LLAMA3_1B = "meta-llama/Llama-3.2-1B"
LLAMA3_3B = "meta-llama/Llama-3.2-3B"
LLAMA3_8B = "meta-llama/Llama-3.1-8B"
MISTRAL = "mistralai/Mistral-7B-v0.1"
QWEN_05 = "Qwen/Qwen2.5-0.5B"
QWEN_15 = "Qwen/Qwen2.5-1.5B"
GEMMA2 = "google/gemma-2-2b"
PHI15 = "microsoft/phi-1_5"
PHI3 = "microsoft/Phi-3-mini-4k-instruct"
FALCON = "tiiuae/falcon-7b"
T0 = "bigscience/T0_3B"
MIXTRAL = "mistralai/Mixtral-8x7B-v0.1"
OPT = "facebook/opt-1.3b"

SUITE: list[dict[str, Any]] = [
    # GPT-2: full fine-tuning in fp32, AMP and pure bf16; optimizers; eager vs SDPA; lengths
    _case("gpt2 full fp32 adamw b8 s512", GPT2, "full", batch=8, dtype="float32", precision="fp32", optim="adamw_torch", gc=False),
    _case("gpt2 full amp-bf16 b8 s512", GPT2, "full", batch=8, dtype="float32", gc=False),
    _case("gpt2 full amp-bf16 gc b8 s1024", GPT2, "full", batch=8, seq=1024, dtype="float32"),
    _case("gpt2 full bf16 eager b4 s1024", GPT2, "full", batch=4, seq=1024, attn="eager", gc=False),
    _case("gpt2 full bf16 adafactor b4 s512", GPT2, "full", batch=4, optim="adafactor", gc=False),
    _case("gpt2 full bf16 sgd b4 s128", GPT2, "full", batch=4, seq=128, optim="sgd", gc=False),
    _case("gpt2 full bf16 adamw_8bit b4 s512", GPT2, "full", batch=4, optim="adamw_8bit", gc=False),
    _case("gpt2 lora c_attn b16 s512", GPT2, "lora", batch=16, targets=["c_attn"], gc=False),
    _case("gpt2-medium full amp-fp16 b4 s1024", GPT2_MEDIUM, "full", batch=4, seq=1024, dtype="float32", precision="fp16"),
    _case("gpt2 inference b8 s512", GPT2, "inference", batch=8),
    # BERT: sequence classification
    _case("bert full amp-bf16 b32 s128", BERT, "full", batch=32, seq=128, dtype="float32", gc=False),
    _case("bert full fp32 b16 s512", BERT, "full", batch=16, dtype="float32", precision="fp32", gc=False, optim="adamw_torch"),
    _case("bert lora b32 s256", BERT, "lora", batch=32, seq=256, targets=["query", "value"], gc=False),
    _case("bert full bf16 gc b16 s512", BERT, "full", batch=16),
    # Llama-2-7B: the reference family
    _case("llama2-7b full bf16 adamw_torch b1 s512", LLAMA2, "full", optim="adamw_torch", gc=False),
    _case("llama2-7b full bf16 fused gc b2 s2048", LLAMA2, "full", batch=2, seq=2048),
    _case("llama2-7b full bf16 paged8 gc b1 s4096", LLAMA2, "full", seq=4096, optim="paged_adamw_8bit"),
    _case("llama2-7b lora qv b1 s512", LLAMA2, "lora", targets=["q_proj", "v_proj"]),
    _case("llama2-7b lora qv b1 s2048", LLAMA2, "lora", seq=2048, targets=["q_proj", "v_proj"]),
    _case("llama2-7b lora all no-gc b2 s1024", LLAMA2, "lora", batch=2, seq=1024, gc=False),
    _case("llama2-7b lora all eager b1 s1024", LLAMA2, "lora", seq=1024, attn="eager"),
    _case("llama2-7b qlora r64 b1 s512", LLAMA2, "qlora", r=64, optim="paged_adamw_32bit"),
    _case("llama2-7b qlora r64 b1 s2048", LLAMA2, "qlora", r=64, seq=2048, optim="paged_adamw_32bit"),
    _case("llama2-7b qlora r16 b4 s2048", LLAMA2, "qlora", batch=4, seq=2048),
    _case("llama2-7b qlora no-gc b1 s1024", LLAMA2, "qlora", seq=1024, gc=False),
    _case("llama2-7b qlora fp16 t4 b1 s512", LLAMA2, "qlora", dtype="float16", precision="fp16", gpu="nvidia-t4-16gb",
          extra={"quantization": {"bnb_4bit_compute_dtype": "float16"}}),
    _case("llama2-7b int8-lora b1 s512", LLAMA2, "int8-lora", precision="fp16", dtype="float16"),
    _case("llama2-7b inference b1 s2048", LLAMA2, "inference", seq=2048),
    _case("llama2-7b inference 4bit b4 s1024", LLAMA2, "inference", batch=4, seq=1024, extra={"quantization": QLORA_4BIT}),
    # Llama-3: large vocabulary (128k) makes the logits matter
    _case("llama3.2-1b full bf16 b4 s2048", LLAMA3_1B, "full", batch=4, seq=2048),
    _case("llama3.2-1b full amp b2 s1024 no-gc", LLAMA3_1B, "full", batch=2, seq=1024, dtype="float32", gc=False),
    _case("llama3.2-1b lora b8 s8192", LLAMA3_1B, "lora", batch=1, seq=8192),
    _case("llama3.2-1b full bf16 b4 s4096", LLAMA3_1B, "full", batch=4, seq=4096),
    _case("llama3.1-8b qlora b1 s4096", LLAMA3_8B, "qlora", seq=4096),
    _case("llama3.1-8b lora b2 s2048", LLAMA3_8B, "lora", batch=2, seq=2048),
    _case("llama3.1-8b inference b1 s8192", LLAMA3_8B, "inference", seq=8192),
    # Mistral
    _case("mistral-7b qlora b2 s1024", MISTRAL, "qlora", batch=2, seq=1024),
    _case("mistral-7b lora qv b1 s4096", MISTRAL, "lora", seq=4096, targets=["q_proj", "v_proj"]),
    _case("mistral-7b full bf16 8bit-adam b1 s1024", MISTRAL, "full", seq=1024, optim="adamw_8bit"),
    _case("mistral-7b inference b2 s4096", MISTRAL, "inference", batch=2, seq=4096),
    # Qwen2.5
    _case("qwen2.5-0.5b full bf16 b8 s1024", QWEN_05, "full", batch=8, seq=1024),
    _case("qwen2.5-0.5b full amp b4 s512 no-gc", QWEN_05, "full", batch=4, dtype="float32", gc=False),
    _case("qwen2.5-0.5b lora b16 s512", QWEN_05, "lora", batch=16),
    _case("qwen2.5-1.5b qlora b4 s2048", QWEN_15, "qlora", batch=4, seq=2048),
    _case("qwen2.5-1.5b full lion b2 s1024", QWEN_15, "full", batch=2, seq=1024, optim="lion_32bit"),
    _case("qwen2.5-1.5b inference b8 s1024", QWEN_15, "inference", batch=8, seq=1024),
    # Gemma-2 (eager attention, soft-capping)
    _case("gemma2-2b lora b2 s1024", GEMMA2, "lora", batch=2, seq=1024, attn="eager"),
    _case("gemma2-2b qlora b1 s2048", GEMMA2, "qlora", seq=2048, attn="eager"),
    _case("gemma2-2b full bf16 b1 s512", GEMMA2, "full", attn="eager"),
    # Phi
    _case("phi-1.5 full bf16 b4 s1024", PHI15, "full", batch=4, seq=1024),
    _case("phi-1.5 lora b8 s512", PHI15, "lora", batch=8, gc=False),
    _case("phi-3-mini qlora b2 s2048", PHI3, "qlora", batch=2, seq=2048),
    _case("phi-3-mini lora b1 s4096", PHI3, "lora", seq=4096),
    # Falcon
    _case("falcon-7b qlora b1 s1024", FALCON, "qlora", seq=1024),
    _case("falcon-7b lora b2 s512", FALCON, "lora", batch=2, targets=["query_key_value"]),
    # OPT
    _case("opt-1.3b full amp-fp16 b4 s512", OPT, "full", batch=4, dtype="float32", precision="fp16"),
    _case("opt-1.3b lora b8 s1024", OPT, "lora", batch=8, seq=1024),
    # T5 (encoder-decoder)
    _case("t0-3b lora b4 s512", T0, "lora", batch=4, targets=["q", "v"]),
    _case("t0-3b full bf16 b2 s256", T0, "full", batch=2, seq=256),
    _case("t0-3b qlora b4 s512", T0, "qlora", batch=4),
    # Mixtral (mixture of experts)
    _case("mixtral-8x7b lora b1 s512", MIXTRAL, "lora", targets=["q_proj", "v_proj"]),
    _case("mixtral-8x7b inference b1 s1024", MIXTRAL, "inference", seq=1024, gpu="nvidia-h200-141gb"),
    # DoRA (peft/tuners/lora/dora.py): its weight-norm transient, and what it saves beyond LoRA
    _case("llama3.2-1b dora all gc b1 s256", LLAMA3_1B, "lora", seq=256, extra={"lora": {"use_dora": True}}),
    _case("llama3.2-3b dora qv bf16-weights no-gc b4 s768", LLAMA3_3B, "lora", batch=4, seq=768, r=32, targets=["q_proj", "v_proj"],
          precision="none", optim="adamw_torch", gc=False, extra={"lora": {"use_dora": True}}),
    _case("llama2-7b qdora gc b1 s256", LLAMA2, "qlora", seq=256, extra={"lora": {"use_dora": True}}),
    _case("gpt2 dora dropout no-gc b8 s512", GPT2, "lora", batch=8, gc=False, extra={"lora": {"use_dora": True, "lora_dropout": 0.1}}),
    # gradient accumulation and frozen layers
    _case("llama3.2-1b full ga4 b2 s1024", LLAMA3_1B, "full", batch=2, seq=1024, extra={"training": {"gradient_accumulation_steps": 4}}),
    _case("qwen2.5-0.5b full frozen12 b4 s1024", QWEN_05, "full", batch=4, seq=1024, extra={"training": {"frozen_layers": 12}}),
]
