"""The simulator is proven: on fake tensors it finds exactly the peak that the same step reaches on
real CPU tensors, measured by the same tracker (CUDA emulation off, since the CPU cannot run CUDA
kernels; the emulation itself is tested in test_cuda_emulation.py)."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from app.calibration.inference import simulate_inference  # noqa: E402
from app.calibration.simulate import SimulationResult, simulate  # noqa: E402
from app.workload import Workload  # noqa: E402
from tests.calibration.conftest import QLORA_4BIT, TINY_BERT, TINY_GPT2, TINY_LLAMA, TINY_T5, make_workload  # noqa: E402

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": "all-linear"}
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "llama gqa full fp32": (TINY_LLAMA, {}),
    "llama full bf16 mixed, checkpointing": (TINY_LLAMA, {"training": {"bf16": True, "gradient_checkpointing": True}}),
    "llama full bf16 weights, fused adamw": (TINY_LLAMA, {"model": {"dtype": "bfloat16"}, "training": {"bf16": True, "optim": "adamw_torch_fused"}}),
    "llama lora q,v with checkpointing": (TINY_LLAMA, {"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "training": {"gradient_checkpointing": True}}),
    "llama qlora all-linear": (TINY_LLAMA, {"model": {"dtype": "bfloat16"}, "quantization": QLORA_4BIT, "lora": LORA, "training": {"bf16": True, "gradient_checkpointing": True}}),
    "llama qlora paged adamw, accumulation": (
        TINY_LLAMA,
        {"quantization": QLORA_4BIT, "lora": LORA, "training": {"bf16": True, "optim": "paged_adamw_32bit", "gradient_accumulation_steps": 4}},
    ),
    "llama 8bit lora": (TINY_LLAMA, {"model": {"dtype": "float16"}, "quantization": {"load_in_8bit": True}, "lora": LORA, "training": {"fp16": True}}),
    "gpt2 full with dropout": (TINY_GPT2, {}),
    "gpt2 lora": (TINY_GPT2, {"lora": {"r": 8, "lora_dropout": 0.1}}),
    "gpt2 qlora": (TINY_GPT2, {"quantization": QLORA_4BIT, "lora": {"r": 8, "target_modules": "all-linear"}, "training": {"bf16": True}}),
    "t5 full": (TINY_T5, {"training": {"max_target_length": 16}}),
    "t5 lora bf16 mixed": (TINY_T5, {"lora": {"r": 8}, "training": {"bf16": True}}),
    "bert full sequence classification": (TINY_BERT, {}),
    "llama adafactor": (TINY_LLAMA, {"training": {"optim": "adafactor"}}),
    "llama sgd, frozen first block": (TINY_LLAMA, {"training": {"optim": "sgd", "frozen_layers": 1}}),
    "llama 8-bit adamw": (TINY_LLAMA, {"training": {"optim": "adamw_8bit"}}),
    "llama dora all-linear, bf16 mixed": (TINY_LLAMA, {"lora": {"r": 8, "target_modules": "all-linear", "use_dora": True}, "training": {"bf16": True}}),
    "llama dora with dropout, checkpointing": (
        TINY_LLAMA, {"lora": {**LORA, "use_dora": True}, "training": {"gradient_checkpointing": True}},
    ),
    "llama qdora (4-bit dora)": (
        TINY_LLAMA,
        {"model": {"dtype": "bfloat16"}, "quantization": QLORA_4BIT, "lora": {**LORA, "use_dora": True}, "training": {"bf16": True}},
    ),
    "llama ia3": (TINY_LLAMA, {"peft": {"peft_type": "IA3"}}),
    "llama prompt tuning": (TINY_LLAMA, {"peft": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8}}),
    "llama prefix tuning": (TINY_LLAMA, {"peft": {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8}}),
}


def _both(workload: Workload, config: dict[str, Any]) -> tuple[SimulationResult, SimulationResult]:
    fake = simulate(workload, config, mode="fake", emulate_cuda=False)
    real = simulate(workload, config, mode="cpu", emulate_cuda=False)
    return fake, real


@pytest.mark.parametrize("name", CASES)
def test_fake_peak_equals_real_cpu_peak(name: str) -> None:
    config, blocks = CASES[name]
    fake, real = _both(make_workload(config, **blocks), config)
    # Exact for every method; bitsandbytes' code map could differ by one 1,024-byte tensor (the
    # cached dynamic map is real, then faked), which the QLoRA cases allow but do not need.
    tolerance = 1024 if "quantization" in blocks else 0
    assert abs(fake.peak_bytes - real.peak_bytes) <= tolerance
    if tolerance == 0:
        assert fake.by_category_at_peak == real.by_category_at_peak
        assert fake.phase_peaks == real.phase_peaks
    assert (fake.peak_phase, fake.peak_step) == (real.peak_phase, real.peak_step)
    assert (fake.num_parameters, fake.trainable_parameters) == (real.num_parameters, real.trainable_parameters)


def test_simulation_reports_every_phase_of_both_steps() -> None:
    result = simulate(make_workload(TINY_LLAMA, training={"bf16": True}), TINY_LLAMA, record_trace=True)
    assert {(p.step, p.phase) for p in result.phase_peaks} == {(s, p) for s in (0, 1) for p in ("forward", "loss", "backward", "optimizer")}
    assert sum(result.by_category_at_peak.values()) == result.peak_bytes
    assert result.trace is not None and sum(event.delta_bytes for event in result.trace) >= 0
    live = 0
    for event in result.trace:
        live += event.delta_bytes
        assert live <= result.peak_bytes


@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_T5], ids=["llama", "t5"])
def test_inference_fake_equals_real_and_skipping_decode_steps_is_exact(config: dict[str, Any]) -> None:
    workload = Workload.model_validate(
        {"model": {"config": config}, "task": "inference", "inference": {"batch_size": 3, "prompt_tokens": 8, "max_new_tokens": 60}}
    )
    full = simulate_inference(workload, config, decode_steps=None, mode="cpu", emulate_cuda=False)
    fake_full = simulate_inference(workload, config, decode_steps=None, mode="fake", emulate_cuda=False)
    skipped = simulate_inference(workload, config, decode_steps=3, mode="fake", emulate_cuda=False)
    assert full.peak_bytes == fake_full.peak_bytes == skipped.peak_bytes
    assert full.kv_cache_bytes == skipped.kv_cache_bytes
    assert skipped.peak_phase == "decode" and skipped.by_category_at_peak["kv_cache"] > 0


def test_kv_cache_is_two_tensors_per_layer_of_all_tokens() -> None:
    workload = Workload.model_validate(
        {"model": {"config": TINY_LLAMA}, "task": "inference", "inference": {"batch_size": 2, "prompt_tokens": 100, "max_new_tokens": 29}}
    )
    result = simulate(workload, TINY_LLAMA)
    # 2 (K, V) x 2 layers x batch 2 x 2 KV heads x 128 tokens (100 + 29 - 1 cached) x head dim 16 x 4 bytes
    assert result.kv_cache_bytes == 2 * 2 * (2 * 2 * 128 * 16 * 4)
