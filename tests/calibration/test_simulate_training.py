"""Training simulations with the GPU's behaviour: optimizers as CUDA runs them, and a 7B QLoRA step."""

from __future__ import annotations

import math
import time

import pytest

torch = pytest.importorskip("torch")

from app.calibration.build import build_model  # noqa: E402
from app.calibration.simulate import simulate, simulate_with_tracker  # noqa: E402
from app.calibration.tracker import rounded_bytes  # noqa: E402
from tests.calibration.conftest import LLAMA2_7B, QLORA_4BIT, TINY_LLAMA, make_workload  # noqa: E402

# Embedding and head of 2048 x 64 = 131,072 elements: above bitsandbytes' 100,000-element paging limit.
WIDE_VOCAB = dict(TINY_LLAMA, vocab_size=2048)
NORM_PARAMETERS = 2 * 2 * 64 + 64  # two RMSNorms per block and the final one: no weight decay, own group


def _categories_at_phase_peak(optim: str, phase: str = "optimizer", step: int = 1) -> dict[str, int]:
    _, tracker = simulate_with_tracker(make_workload(WIDE_VOCAB, training={"optim": optim}), WIDE_VOCAB)
    return tracker.live_by_category_at(tracker.phase_peaks[(step, phase)].event_index)


def _trainable_numels() -> list[tuple[str, int]]:
    model = build_model(WIDE_VOCAB, make_workload(WIDE_VOCAB), device="meta")
    return [(name, parameter.numel()) for name, parameter in model.named_parameters()]


def test_adamw_torch_runs_foreach_with_a_parameter_sized_temporary() -> None:
    """CUDA defaults AdamW to foreach (torch/optim/optimizer.py ``_default_to_fused_or_foreach``):
    ``_foreach_sqrt(exp_avg_sqs)`` holds a copy of the decay group's second moments."""
    result = simulate(make_workload(WIDE_VOCAB, training={"optim": "adamw_torch"}), WIDE_VOCAB)
    decay_bytes = 4 * (sum(numel for _, numel in _trainable_numels()) - NORM_PARAMETERS)
    assert result.peak_phase == "optimizer"
    assert result.by_category_at_peak["temporaries"] == decay_bytes
    # exp_avg and exp_avg_sq; the step counters are host tensors (``torch.tensor(0.0)``) on a GPU run
    assert result.by_category_at_peak["optimizer_state"] == sum(2 * rounded_bytes(4 * numel) for _, numel in _trainable_numels())


def test_fused_adamw_has_no_step_temporary_but_keeps_step_counters_on_the_device() -> None:
    split = _categories_at_phase_peak("adamw_torch_fused")
    trainable = _trainable_numels()
    assert split["temporaries"] < 64 * 1024  # only clip_grad_norm's per-tensor norms
    assert split["optimizer_state"] == sum(2 * rounded_bytes(4 * numel) + 512 for _, numel in trainable)


def test_sgd_without_momentum_keeps_no_state() -> None:
    result = simulate(make_workload(WIDE_VOCAB, training={"optim": "sgd"}), WIDE_VOCAB)
    assert result.by_category_at_peak["optimizer_state"] == 0


def test_paged_optimizer_state_of_large_tensors_lives_outside_the_allocator() -> None:
    result = simulate(make_workload(WIDE_VOCAB, training={"optim": "paged_adamw_32bit"}), WIDE_VOCAB)
    # embedding and head: 2 tensors x 2 fp32 states x 131,072 elements (bitsandbytes/optim/optimizer.py:383)
    assert result.outside_allocator_bytes == 2 * 2 * 4 * 131072
    small = sum(2 * rounded_bytes(4 * numel) for _, numel in _trainable_numels() if numel < 100_000)
    assert result.by_category_at_peak["optimizer_state"] == small


def test_8bit_adamw_quantizes_large_states_but_keeps_embeddings_in_32_bit() -> None:
    """bitsandbytes init_state: uint8 states and an fp32 absmax per 256 values from 4096 elements on
    (optimizer.py:502-529); the Trainer overrides embeddings to 32-bit (trainer.py:1328-1339)."""
    expected = 2 * 1024  # the optimizer's signed and unsigned dynamic code maps, 256 fp32 each
    for name, numel in _trainable_numels():
        if "embed_tokens" in name or numel < 4096:
            expected += 2 * rounded_bytes(4 * numel)
        else:
            expected += 2 * rounded_bytes(numel) + 2 * rounded_bytes(4 * math.ceil(numel / 256))
    assert _categories_at_phase_peak("adamw_8bit", "forward")["optimizer_state"] == expected


def test_attention_implementations_without_cpu_kernels_are_simulated_as_sdpa() -> None:
    result = simulate(make_workload(TINY_LLAMA, training={"attn_implementation": "flash_attention_2", "bf16": True}), TINY_LLAMA)
    assert any("flash_attention_2" in note for note in result.notes)


def test_llama2_7b_qlora_2048_tokens_with_checkpointing_simulates_in_seconds() -> None:
    """The issue's benchmark case: nf4 + double quantization, r=64 on all linear layers, bf16 compute,
    adapters cast to bf16 as TRL does, paged AdamW 32-bit, batch 1 x 2048 tokens, gradient
    checkpointing, on the A100 80 GB."""
    workload = make_workload(
        LLAMA2_7B,
        model={"dtype": "bfloat16"},
        quantization=QLORA_4BIT,
        lora={"r": 64, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": "all-linear", "adapter_dtype": "bfloat16"},
        training={"per_device_train_batch_size": 1, "max_seq_length": 2048, "gradient_checkpointing": True, "optim": "paged_adamw_32bit", "bf16": True},
    )
    started = time.perf_counter()
    result = simulate(workload, LLAMA2_7B)
    assert time.perf_counter() - started < 60
    assert {p.phase for p in result.phase_peaks} == {"forward", "loss", "backward", "optimizer"}
    assert result.trainable_parameters == 159_907_840 and result.num_parameters == 6_898_323_456
    # Simulated with torch 2.13.0, transformers 5.24.0, peft 0.21.2, bitsandbytes 0.50.2, accelerate 1.15.0:
    # the peak opens the backward (fp32 log-softmax and its two gradients), over the 32 fp32 hidden
    # states that checkpointing keeps (prepare_model_for_kbit_training made the embeddings fp32).
    assert (result.peak_phase, result.peak_step) == ("backward", 0)
    assert result.peak_bytes == PINNED_7B_QLORA_PEAK
    assert result.by_category_at_peak["quantization_state"] == 103_252_992
    assert result.outside_allocator_bytes == 2 * 4 * 159_907_840  # every adapter has >= 100,000 elements: all paged


PINNED_7B_QLORA_PEAK = 6_868_708_352


def test_lora_on_a_classifier_model_simulates_with_the_copied_head() -> None:
    # PEFT deep-copies the classification head (modules_to_save for SEQ_CLS); under fake tensors the
    # copy must share the simulation's fake mode, or the step fails with "Mixing fake modes".
    from tests.calibration.conftest import TINY_BERT

    workload = make_workload(TINY_BERT, lora={"r": 4, "target_modules": ["query", "value"]}, training={"bf16": True})
    result = simulate(workload, TINY_BERT)
    assert result.peak_bytes > 0
    assert result.trainable_parameters > 0


# Wide layers, few tokens: DoRA's per-call weight norm is nearly all the forward's temporaries.
WIDE_LAYERS = dict(TINY_LLAMA, hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8)


@pytest.mark.parametrize(("dtype", "bf16", "quantization"), [("float32", False, None), ("bfloat16", True, None), ("bfloat16", True, QLORA_4BIT)],
                         ids=["fp32", "bf16-autocast", "4bit"])
def test_dora_weight_norm_transient_equals_the_simulated_one(catalog, dtype: str, bf16: bool, quantization) -> None:
    """dora.py's largest-layer transient (eye, its 16-bit copy, the LoRA product, the cast weight,
    the scaled product and the sum) against the temporaries at the simulated forward peak."""
    from app.estimator.dora import dora_transient_bytes
    from app.estimator.model import resolve_model
    from app.estimator.setup import resolve_setup

    blocks = {"model": {"dtype": dtype}, "lora": {"r": 8, "target_modules": "all-linear", "use_dora": True},
              "training": {"per_device_train_batch_size": 1, "max_seq_length": 8, "bf16": bf16}}
    if quantization:
        blocks["quantization"] = quantization
    workload = make_workload(WIDE_LAYERS, **blocks)
    _, tracker = simulate_with_tracker(workload, WIDE_LAYERS)
    simulated = tracker.live_by_category_at(tracker.phase_peaks[(1, "forward")].event_index)["temporaries"]
    model = resolve_model(workload.model, catalog, workload.software)
    estimated = dora_transient_bytes(model, resolve_setup(workload, model.arch, model.modules, catalog.gpu("A100-80GB")), workload)
    assert estimated > 2**20
    assert abs(simulated - estimated) <= 0.01 * estimated, f"simulated {simulated:,} B, estimated {estimated:,} B"


def test_prefix_tuning_costs_what_the_simulator_finds(catalog) -> None:
    """PEFT prefix tuning: past keys and values before every layer's, a per-layer mask, the efficient
    kernel and repeat_kv copies to every head (blocks.py ``_sdpa_after_prefix``). Against LN tuning of
    the same frozen model (exact in test_activations_autograd.py), the extra peak bytes match the
    simulator within 2%; without the rule the estimate adds almost nothing."""
    from app.estimator.estimate import estimate

    config = dict(TINY_LLAMA, hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2)
    training = {"per_device_train_batch_size": 4, "max_seq_length": 256, "bf16": True}

    def peaks(peft: dict) -> tuple[int, int]:
        workload = make_workload(config, model={"dtype": "bfloat16"}, peft=peft, training=training)
        estimated = estimate(workload, catalog)
        return simulate(workload, config).peak_bytes, estimated.allocated_peak_bytes

    (sim_prefix, est_prefix), (sim_base, est_base) = peaks({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 64}), peaks({"peft_type": "LN_TUNING"})
    simulated, estimated = sim_prefix - sim_base, est_prefix - est_base
    assert simulated > 2**20
    assert abs(estimated - simulated) <= 0.02 * simulated, f"simulated {simulated:,} B more, estimated {estimated:,} B more"
