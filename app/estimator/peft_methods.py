"""Trainable parameters of PEFT methods other than LoRA (peft 0.21 tuners).

IA3 (arXiv:2205.05638): one learned vector per targeted linear layer, of its output size, or of its
input size for feed-forward modules (peft/tuners/ia3/layer.py). Prompt tuning: num_virtual_tokens x
hidden embeddings, once per transformer stack (peft/tuners/prompt_tuning/model.py); P-tuning adds
its MLP prompt encoder (three hidden x hidden layers with biases, peft/tuners/p_tuning/model.py
PromptEncoder: ``encoder_num_layers`` is ignored for MLP). Prefix tuning:
num_virtual_tokens x layers x 2 x kv width (peft/tuners/prefix_tuning/model.py, no projection).
LN tuning: the layer norms (peft/tuners/ln_tuning).
"""

from __future__ import annotations

from app.estimator.architecture import Architecture, Kind
from app.estimator.params import Module, ModuleKind
from app.estimator.setup import matches_target
from app.estimator.states import TensorGroup
from app.workload import Peft, PeftType

# peft/utils/constants.py TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING (llama-like entries).
IA3_DEFAULT_TARGETS = {"targets": ["k_proj", "v_proj", "down_proj"], "feedforward": ["down_proj"]}
IA3_FAMILY_TARGETS: dict[str, dict[str, list[str]]] = {
    "gpt2": {"targets": ["c_attn", "mlp.c_proj"], "feedforward": ["mlp.c_proj"]},
    "t5": {"targets": ["k", "v", "wo"], "feedforward": ["wo"]},
    "mt5": {"targets": ["k", "v", "wi_1"], "feedforward": []},
    "bert": {"targets": ["key", "value", "output.dense"], "feedforward": ["output.dense"]},
    "falcon": {"targets": ["query_key_value", "dense_4h_to_h"], "feedforward": ["dense_4h_to_h"]},
    "bloom": {"targets": ["query_key_value", "dense_4h_to_h"], "feedforward": ["dense_4h_to_h"]},
    "gpt_neox": {"targets": ["query_key_value", "dense_4h_to_h"], "feedforward": ["dense_4h_to_h"]},
    "opt": {"targets": ["k_proj", "v_proj", "fc2"], "feedforward": ["fc2"]},
    "phi": {"targets": ["k_proj", "v_proj", "fc2"], "feedforward": ["fc2"]},
    "phi3": {"targets": ["qkv_proj", "down_proj"], "feedforward": ["down_proj"]},
    "gpt_bigcode": {"targets": ["c_attn", "mlp.c_proj"], "feedforward": ["mlp.c_proj"]},
}


def peft_tensor_groups(peft: Peft, arch: Architecture, modules: list[Module]) -> list[TensorGroup]:
    """The trainable tensors a PEFT method adds, grouped by shape."""
    stacks = 2 if arch.kind is Kind.encoder_decoder else 1
    hidden = arch.hidden_size
    if peft.peft_type is PeftType.IA3:
        return _ia3_groups(peft, arch, modules)
    if peft.peft_type is PeftType.PROMPT_TUNING:
        return [TensorGroup(rows=peft.num_virtual_tokens * stacks, cols=hidden, count=1)]
    if peft.peft_type is PeftType.P_TUNING:
        return [TensorGroup(rows=peft.num_virtual_tokens * stacks, cols=hidden, count=1),
                TensorGroup(rows=hidden, cols=hidden, count=3), TensorGroup(rows=hidden, cols=1, count=3)]
    if peft.peft_type is PeftType.PREFIX_TUNING:
        return [TensorGroup(rows=peft.num_virtual_tokens, cols=arch.total_layers * 2 * arch.kv_dim, count=1)]
    norms = [m for m in modules if m.kind is ModuleKind.norm]
    return [TensorGroup(rows=m.weight_numel + m.bias_numel, cols=1, count=m.count) for m in norms]


def ia3_module_names(peft: Peft, arch: Architecture, modules: list[Module]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(linear modules IA3 adapts, those of them it treats as feed-forward), PEFT's defaults for the
    family where the config names none."""
    defaults = IA3_FAMILY_TARGETS.get(arch.family, IA3_DEFAULT_TARGETS)
    targets = peft.target_modules if peft.target_modules is not None else defaults["targets"]
    feedforward = peft.feedforward_modules if peft.feedforward_modules is not None else defaults["feedforward"]
    adapted = tuple(m.name for m in modules if m.kind is ModuleKind.linear and any(matches_target(m.name, t) for t in targets))
    return adapted, tuple(name for name in adapted if any(matches_target(name, t) for t in feedforward))


def _ia3_groups(peft: Peft, arch: Architecture, modules: list[Module]) -> list[TensorGroup]:
    adapted, feedforward = ia3_module_names(peft, arch, modules)
    return [TensorGroup(rows=m.in_features if m.name in feedforward else m.out_features, cols=1, count=m.count)
            for m in modules if m.kind is ModuleKind.linear and m.name in adapted]


def extra_tokens(peft: Peft | None) -> int:
    """Virtual tokens prepended to every sequence (prompt tuning and P-tuning)."""
    if peft is not None and peft.peft_type in (PeftType.PROMPT_TUNING, PeftType.P_TUNING):
        return peft.num_virtual_tokens
    return 0


def prefix_tokens(peft: Peft | None) -> int:
    """Virtual tokens prefix tuning puts before every layer's keys and values."""
    if peft is not None and peft.peft_type is PeftType.PREFIX_TUNING:
        return peft.num_virtual_tokens
    return 0
