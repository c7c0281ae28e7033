"""Invariants over many models, GPUs and setups (hypothesis): more work never needs less memory."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.catalog import load_catalog
from app.estimator.estimate import estimate
from app.workload import Workload

CATALOG = load_catalog()
DECODERS = sorted(m for m, p in CATALOG.models.items() if p.config["model_type"] not in ("bert", "t5", "mt5"))
ALL_MODELS = sorted(CATALOG.models)
GPUS = sorted(CATALOG.gpus)
METHODS = ["full", "lora", "qlora", "int8-lora"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def workload(model_id: str, method: str, batch: int = 1, seq: int = 512, r: int = 16, gc: bool = True,
             gpu: str = "nvidia-a100-80gb", optim: str = "adamw_torch", attn: str = "sdpa") -> Workload:
    data: dict[str, Any] = {
        "model": {"id": model_id, "dtype": "bfloat16"},
        "training": {"per_device_train_batch_size": batch, "max_seq_length": seq, "gradient_checkpointing": gc,
                     "optim": optim, "bf16": True, "attn_implementation": attn},
        "hardware": {"gpu": gpu},
    }
    if method != "full":
        data["lora"] = {"r": r, "target_modules": "all-linear"}
    if method == "qlora":
        data["quantization"] = {"load_in_4bit": True, "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}
    if method == "int8-lora":
        data["quantization"] = {"load_in_8bit": True}
    return Workload.model_validate(data)


def peaks(w: Workload) -> tuple[int, int, int]:
    result = estimate(w, CATALOG)
    return result.allocated_peak_bytes, result.reserved_peak_bytes, result.peak_bytes


def at_least(bigger: tuple[int, ...], smaller: tuple[int, ...]) -> bool:
    return all(b >= s for b, s in zip(bigger, smaller, strict=True))


models = st.sampled_from(ALL_MODELS)
methods = st.sampled_from(METHODS)
gc = st.booleans()
attn = st.sampled_from(["sdpa", "eager"])


@SETTINGS
@given(models, methods, st.integers(1, 31), st.sampled_from([128, 512, 2048]), gc, attn)
def test_more_batch_never_uses_less_memory(model_id, method, batch, seq, checkpointing, attn_impl):
    small = workload(model_id, method, batch=batch, seq=seq, gc=checkpointing, attn=attn_impl)
    large = workload(model_id, method, batch=batch + 1, seq=seq, gc=checkpointing, attn=attn_impl)
    assert at_least(peaks(large), peaks(small))


@SETTINGS
@given(models, methods, st.integers(16, 8192), st.integers(1, 512), gc, attn)
def test_longer_sequences_never_use_less_memory(model_id, method, seq, extra, checkpointing, attn_impl):
    short = workload(model_id, method, seq=seq, gc=checkpointing, attn=attn_impl)
    longer = workload(model_id, method, seq=seq + extra, gc=checkpointing, attn=attn_impl)
    assert at_least(peaks(longer), peaks(short))


@SETTINGS
@given(models, st.sampled_from(["lora", "qlora"]), st.integers(1, 8), st.sampled_from([128, 512, 2048]), gc)
def test_dora_never_uses_less_memory_than_the_same_lora(model_id, method, batch, seq, checkpointing):
    lora = workload(model_id, method, batch=batch, seq=seq, gc=checkpointing)
    dora = lora.model_copy(update={"lora": lora.lora.model_copy(update={"use_dora": True})})
    assert at_least(peaks(dora), peaks(lora))


@SETTINGS
@given(st.sampled_from(DECODERS), st.sampled_from(["lora", "qlora", "int8-lora"]), st.integers(1, 128), st.integers(1, 128))
def test_larger_lora_rank_never_uses_less_memory(model_id, method, r, extra):
    assert at_least(peaks(workload(model_id, method, r=r + extra)), peaks(workload(model_id, method, r=r)))


@SETTINGS
@given(models, methods, st.integers(1, 16), st.sampled_from([128, 512, 2048, 4096]), attn)
def test_gradient_checkpointing_never_uses_more_memory(model_id, method, batch, seq, attn_impl):
    with_gc = workload(model_id, method, batch=batch, seq=seq, gc=True, attn=attn_impl)
    without = workload(model_id, method, batch=batch, seq=seq, gc=False, attn=attn_impl)
    assert at_least(peaks(without), peaks(with_gc))


@SETTINGS
@given(models, st.sampled_from(GPUS), st.booleans())
def test_4bit_weights_never_exceed_16bit_weights(model_id, gpu, double_quant):
    base = {"model": {"id": model_id, "dtype": "bfloat16"}, "task": "inference", "hardware": {"gpu": gpu}}
    plain = estimate(Workload.model_validate(base), CATALOG)
    quant = estimate(Workload.model_validate({**base, "quantization": {"load_in_4bit": True, "bnb_4bit_use_double_quant": double_quant}}), CATALOG)
    assert quant.terms["weights"] + quant.terms["quantization_constants"] <= plain.terms["weights"]
    assert quant.peak_bytes <= plain.peak_bytes


@SETTINGS
@given(models, methods, st.sampled_from(GPUS))
def test_terms_are_non_negative_and_levels_are_ordered(model_id, method, gpu):
    result = estimate(workload(model_id, method, gpu=gpu), CATALOG)
    assert all(value >= 0 for value in result.terms.values())
    assert result.allocated_peak_bytes <= result.reserved_peak_bytes <= result.peak_bytes
    assert result.fits == (result.peak_bytes <= result.usable_bytes)
    assert result.headroom_bytes == result.usable_bytes - result.peak_bytes
