"""Exact parameter counts per module, from an architecture and its config.

Each family lists its modules as transformers 5.24 builds them (``modeling_<family>.py``): leaf
name, kind, shape and how many instances the model holds. The total equals
``sum(p.numel() for p in model.parameters())`` of the model built on the meta device, tied weights
counted once; a test checks that for every profile. Encoder-only models are counted with a
sequence-classification head (``AutoModelForSequenceClassification``), the head people fine-tune.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

from app.estimator.architecture import LLAMA_LIKE, Architecture, Kind


class ModuleKind(StrEnum):
    linear = "linear"  # nn.Linear / Conv1D: quantizable, LoRA-targetable
    head = "head"  # the output projection (lm_head): left unquantized, not in "all-linear"
    embedding = "embedding"
    norm = "norm"
    experts = "experts"  # fused expert tensors (transformers 5 MoE): not nn.Linear
    other = "other"  # routers, relative position biases, ...


class Module(BaseModel):
    """``count`` instances of a leaf module, each with a weight of ``weight_numel`` elements."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: ModuleKind
    in_features: int = 0
    out_features: int = 0
    weight_numel: int
    bias_numel: int = 0
    count: int = 1
    per_layer: bool = True

    @property
    def numel(self) -> int:
        return self.count * (self.weight_numel + self.bias_numel)


def _linear(name: str, in_features: int, out_features: int, count: int, bias: bool = False) -> Module:
    return Module(
        name=name,
        kind=ModuleKind.linear,
        in_features=in_features,
        out_features=out_features,
        weight_numel=in_features * out_features,
        bias_numel=out_features if bias else 0,
        count=count,
    )


def _norm(name: str, arch: Architecture, count: int, per_layer: bool = True, width: int | None = None) -> Module:
    size = width or arch.hidden_size
    return Module(
        name=name,
        kind=ModuleKind.norm,
        weight_numel=size,
        bias_numel=size if arch.norm == "layer" else 0,
        count=count,
        per_layer=per_layer,
    )


def _embedding(name: str, rows: int, width: int) -> Module:
    return Module(name=name, kind=ModuleKind.embedding, weight_numel=rows * width, per_layer=False)


def _head(arch: Architecture, bias: bool = False) -> list[Module]:
    if arch.tie_word_embeddings:
        return []
    return [
        Module(
            name="lm_head",
            kind=ModuleKind.head,
            in_features=arch.hidden_size,
            out_features=arch.vocab_size,
            weight_numel=arch.hidden_size * arch.vocab_size,
            bias_numel=arch.vocab_size if bias else 0,
            per_layer=False,
        )
    ]


def _llama_like(arch: Architecture, config: dict[str, Any]) -> list[Module]:
    h, n = arch.hidden_size, arch.num_layers
    attn_bias = arch.family == "qwen2" or config.get("attention_bias", False)
    mlp_bias = config.get("mlp_bias", False)
    if arch.family == "phi3":
        attention = [
            _linear("qkv_proj", h, arch.q_dim + 2 * arch.kv_dim, n),
            _linear("o_proj", arch.q_dim, h, n),
        ]
    else:
        attention = [
            _linear("q_proj", h, arch.q_dim, n, attn_bias),
            _linear("k_proj", h, arch.kv_dim, n, attn_bias),
            _linear("v_proj", h, arch.kv_dim, n, attn_bias),
            _linear("o_proj", arch.q_dim, h, n, bool(config.get("attention_bias", False))),
        ]
    if arch.family == "qwen3":
        attention += [_norm("q_norm", arch, n, width=arch.head_dim), _norm("k_norm", arch, n, width=arch.head_dim)]
    modules = [_embedding("embed_tokens", arch.vocab_size, h), *attention]
    modules += _mlp_llama_like(arch, config, mlp_bias)
    modules += [_norm("layernorm", arch, n * arch.norms_per_layer), _norm("norm", arch, 1, per_layer=False)]
    return modules + _head(arch)


def _shared_expert(arch: Architecture, config: dict[str, Any]) -> list[Module]:
    """Qwen2-MoE's dense shared expert beside the routed ones, and its sigmoid gate (nn.Linear(h, 1))."""
    h, n, shared = arch.hidden_size, arch.num_layers, config.get("shared_expert_intermediate_size")
    if not shared:
        return []
    return [
        _linear("shared_expert.gate_proj", h, shared, n),
        _linear("shared_expert.up_proj", h, shared, n),
        _linear("shared_expert.down_proj", shared, h, n),
        Module(name="shared_expert_gate", kind=ModuleKind.other, weight_numel=h, count=n),
    ]


def _mlp_llama_like(arch: Architecture, config: dict[str, Any], bias: bool) -> list[Module]:
    h, n, inter = arch.hidden_size, arch.num_layers, arch.intermediate_size
    if arch.num_experts and not arch.fused_experts:
        # transformers 4.x: an nn.ModuleList of per-expert MLPs (modeling_mixtral.py
        # MixtralBlockSparseTop2MLP w1/w3/w2; modeling_qwen2_moe.py Qwen2MoeMLP gate/up/down_proj)
        experts = arch.num_experts
        if arch.family == "mixtral":
            modules = [
                _linear("block_sparse_moe.gate", h, experts, n),
                _linear("w1", h, inter, n * experts),
                _linear("w3", h, inter, n * experts),
                _linear("w2", inter, h, n * experts),
            ]
        else:
            modules = [
                _linear("mlp.gate", h, experts, n),
                _linear("experts.gate_proj", h, inter, n * experts),
                _linear("experts.up_proj", h, inter, n * experts),
                _linear("experts.down_proj", inter, h, n * experts),
            ]
        return modules + _shared_expert(arch, config)
    if arch.num_experts:
        experts = arch.num_experts
        modules = [
            Module(name="gate", kind=ModuleKind.other, weight_numel=experts * h, count=n),
            Module(name="experts.gate_up_proj", kind=ModuleKind.experts, in_features=h, out_features=2 * inter,
                   weight_numel=experts * 2 * inter * h, count=n),
            Module(name="experts.down_proj", kind=ModuleKind.experts, in_features=inter, out_features=h,
                   weight_numel=experts * h * inter, count=n),
        ]
        return modules + _shared_expert(arch, config)
    if arch.family == "phi3":
        return [_linear("gate_up_proj", h, 2 * inter, n), _linear("down_proj", inter, h, n)]
    return [
        _linear("gate_proj", h, inter, n, bias),
        _linear("up_proj", h, inter, n, bias),
        _linear("down_proj", inter, h, n, bias),
    ]


def _gpt2(arch: Architecture, config: dict[str, Any]) -> list[Module]:
    h, n, inter = arch.hidden_size, arch.num_layers, arch.intermediate_size
    return [
        _embedding("wte", arch.vocab_size, h),
        _embedding("wpe", arch.max_position_embeddings or 1024, h),
        _linear("c_attn", h, arch.q_dim + 2 * arch.kv_dim, n, bias=True),
        _linear("attn.c_proj", h, h, n, bias=True),
        _linear("c_fc", h, inter, n, bias=True),
        _linear("mlp.c_proj", inter, h, n, bias=True),
        _norm("ln", arch, 2 * n),
        _norm("ln_f", arch, 1, per_layer=False),
        *_head(arch),
    ]


def _bert(arch: Architecture, config: dict[str, Any]) -> list[Module]:
    h, n, inter = arch.hidden_size, arch.num_layers, arch.intermediate_size
    labels = len(config.get("id2label") or {}) or config.get("num_labels") or 2
    return [
        _embedding("word_embeddings", arch.vocab_size, h),
        _embedding("position_embeddings", arch.max_position_embeddings or 512, h),
        _embedding("token_type_embeddings", config.get("type_vocab_size", 2), h),
        _norm("embeddings.LayerNorm", arch, 1, per_layer=False),
        _linear("query", h, h, n, bias=True),
        _linear("key", h, h, n, bias=True),
        _linear("value", h, h, n, bias=True),
        _linear("attention.output.dense", h, h, n, bias=True),
        _linear("intermediate.dense", h, inter, n, bias=True),
        _linear("output.dense", inter, h, n, bias=True),
        _norm("LayerNorm", arch, 2 * n),
        Module(name="pooler.dense", kind=ModuleKind.linear, in_features=h, out_features=h, weight_numel=h * h,
               bias_numel=h, per_layer=False),
        Module(name="classifier", kind=ModuleKind.head, in_features=h, out_features=labels, weight_numel=h * labels,
               bias_numel=labels, per_layer=False),
    ]


def _falcon(arch: Architecture, config: dict[str, Any]) -> list[Module]:
    h, n = arch.hidden_size, arch.num_layers
    bias = config.get("bias", False)
    return [
        _embedding("word_embeddings", arch.vocab_size, h),
        _linear("query_key_value", h, arch.q_dim + 2 * arch.kv_dim, n, bias),
        _linear("dense", h, h, n, bias),
        _linear("dense_h_to_4h", h, arch.intermediate_size, n, bias),
        _linear("dense_4h_to_h", arch.intermediate_size, h, n, bias),
        _norm("ln", arch, arch.norms_per_layer * n),
        _norm("ln_f", arch, 1, per_layer=False),
        *_head(arch),
    ]


def _opt(arch: Architecture, config: dict[str, Any]) -> list[Module]:
    h, n = arch.hidden_size, arch.num_layers
    proj = config.get("word_embed_proj_dim") or h
    bias = config.get("enable_bias", True)
    final_norm = config.get("do_layer_norm_before", True) and not config.get("_remove_final_layer_norm", False)
    modules = [
        _embedding("embed_tokens", arch.vocab_size, proj),
        _embedding("embed_positions", (arch.max_position_embeddings or 2048) + 2, h),  # OPT offsets positions by 2
        _linear("q_proj", h, h, n, bias),
        _linear("k_proj", h, h, n, bias),
        _linear("v_proj", h, h, n, bias),
        _linear("out_proj", h, h, n, bias),
        _linear("fc1", h, arch.intermediate_size, n, bias),
        _linear("fc2", arch.intermediate_size, h, n, bias),
        _norm("layer_norm", arch, 2 * n),
    ]
    if final_norm:
        modules.append(_norm("final_layer_norm", arch, 1, per_layer=False))
    if proj != h:
        modules += [
            Module(name="project_in", kind=ModuleKind.linear, in_features=proj, out_features=h, weight_numel=proj * h, per_layer=False),
            Module(name="project_out", kind=ModuleKind.linear, in_features=h, out_features=proj, weight_numel=proj * h, per_layer=False),
        ]
    return modules + _head(arch)


def _bloom_neox(arch: Architecture, config: dict[str, Any]) -> list[Module]:
    h, n = arch.hidden_size, arch.num_layers
    bloom = arch.family == "bloom"
    bias = True if bloom else config.get("attention_bias", True)
    modules = [
        _embedding("word_embeddings" if bloom else "embed_in", arch.vocab_size, h),
        _linear("query_key_value", h, 3 * h, n, bias),
        _linear("dense", h, h, n, bias),
        _linear("dense_h_to_4h", h, arch.intermediate_size, n, True),
        _linear("dense_4h_to_h", arch.intermediate_size, h, n, True),
        _norm("layernorm", arch, 2 * n),
        _norm("final_layer_norm", arch, 1, per_layer=False),
    ]
    if bloom:
        modules.append(_norm("word_embeddings_layernorm", arch, 1, per_layer=False))
    return modules + _head(arch)


def _phi(arch: Architecture, config: dict[str, Any]) -> list[Module]:
    h, n = arch.hidden_size, arch.num_layers
    modules = [
        _embedding("embed_tokens", arch.vocab_size, h),
        _linear("q_proj", h, arch.q_dim, n, True),
        _linear("k_proj", h, arch.kv_dim, n, True),
        _linear("v_proj", h, arch.kv_dim, n, True),
        _linear("dense", arch.q_dim, h, n, True),
        _linear("fc1", h, arch.intermediate_size, n, True),
        _linear("fc2", arch.intermediate_size, h, n, True),
        _norm("input_layernorm", arch, n),
        _norm("final_layernorm", arch, 1, per_layer=False),
    ]
    if config.get("qk_layernorm", False):
        modules.append(_norm("qk_layernorm", arch, 2 * n, width=arch.head_dim))
    return modules + _head(arch, bias=True)


def _t5(arch: Architecture, config: dict[str, Any]) -> list[Module]:
    d, inner, ff = arch.hidden_size, arch.q_dim, arch.intermediate_size
    enc, dec = arch.num_layers, arch.num_decoder_layers
    attn_blocks = enc + 2 * dec  # encoder self, decoder self and cross
    ff_names = ["wi_0", "wi_1"] if arch.gated_mlp else ["wi"]
    buckets = config.get("relative_attention_num_buckets", 32)
    modules = [
        _embedding("shared", arch.vocab_size, d),
        _linear("q", d, inner, attn_blocks),
        _linear("k", d, inner, attn_blocks),
        _linear("v", d, inner, attn_blocks),
        _linear("o", inner, d, attn_blocks),
        *[_linear(name, d, ff, enc + dec) for name in ff_names],
        _linear("wo", ff, d, enc + dec),
        Module(name="relative_attention_bias", kind=ModuleKind.other, weight_numel=buckets * arch.num_heads, count=2, per_layer=False),
        _norm("layer_norm", arch, 2 * enc + 3 * dec),
        _norm("final_layer_norm", arch, 2, per_layer=False),
    ]
    return modules + _head(arch)


_BUILDERS = {
    **{family: _llama_like for family in LLAMA_LIKE},
    "gpt2": _gpt2,
    "gpt_bigcode": _gpt2,
    "bert": _bert,
    "falcon": _falcon,
    "opt": _opt,
    "bloom": _bloom_neox,
    "gpt_neox": _bloom_neox,
    "phi": _phi,
    "t5": _t5,
    "mt5": _t5,
}


def list_modules(arch: Architecture, config: dict[str, Any]) -> list[Module]:
    """Every parameter-holding module of the model, grouped by leaf name."""
    return _BUILDERS[arch.family](arch, config)


def count_parameters(modules: list[Module]) -> int:
    """Total parameters, tied weights once (``sum(p.numel() for p in model.parameters())``)."""
    return sum(module.numel for module in modules)


def count_by_kind(modules: list[Module]) -> dict[ModuleKind, int]:
    """Parameters per module kind."""
    totals: dict[ModuleKind, int] = {}
    for module in modules:
        totals[module.kind] = totals.get(module.kind, 0) + module.numel
    return totals


def is_encoder_decoder(arch: Architecture) -> bool:
    return arch.kind is Kind.encoder_decoder
