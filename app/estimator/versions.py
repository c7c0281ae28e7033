"""Library versions that change memory: each behaviour is a named rule with its source.

A Workload may name the versions it runs with (``software``); None means the versions vramplan
was calibrated with (``CALIBRATED_WITH``), which every estimate states.
"""

from __future__ import annotations

from app.workload import Software

CALIBRATED_WITH = {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2", "bitsandbytes": "0.50.2", "trl": "1.16.0"}


class VersionError(ValueError):
    """A version string that is not of the form MAJOR.MINOR[.PATCH]."""


def parse_version(text: str | None, library: str) -> tuple[int, int]:
    """``"4.46.0"`` -> (4, 46); None -> the calibrated version of ``library``."""
    value = text or CALIBRATED_WITH[library]
    parts = value.strip().lstrip("v").split("+")[0].split(".")
    try:
        major = int(parts[0])
        minor = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    except ValueError as error:
        raise VersionError(f"software.{library} {text!r} is not a version like '2.4' or '4.48.1'") from error
    return major, minor


def transformers_major(version: str | None) -> int:
    """Major version of transformers named in a Workload (None: the calibrated 5.x)."""
    return parse_version(version, "transformers")[0]


# Rule transformers4_logits: transformers 4.x LlamaForCausalLM-style models upcast the logits and
# shift a contiguous copy before the loss (loss/loss_utils.py ForCausalLMLoss in 4.46-4.57:
# ``shift_logits = logits[..., :-1, :].contiguous()``); 5.x pads the labels instead.
def copies_shifted_logits(software: Software) -> bool:
    return transformers_major(software.transformers) < 5


# Rule transformers445_last_logits: since transformers 4.45 ``generate`` passes num_logits_to_keep=1
# (generation/utils.py ``_supports_num_logits_to_keep``; models/qwen2/modeling_qwen2.py
# ``self.lm_head(hidden_states[:, -num_logits_to_keep:, :]).float()``), so prefill computes the logits
# of the last position only. Before (4.38-4.44: ``logits = self.lm_head(hidden_states); logits =
# logits.float()``) it computed them, and an fp32 copy, for every prompt token.
def prefill_keeps_last_logits_only(software: Software) -> bool:
    return parse_version(software.transformers, "transformers") >= (4, 45)


# Rule transformers436_cache_update: before 4.36 every attention layer returned a new tuple,
# ``key_states = torch.cat([past_key_value[0], key_states], dim=2)`` (modeling_llama.py 4.35.2), while
# generate still held the previous step's tuples: at the end of a decoding step both caches are alive.
# 4.36 introduced cache_utils.py DynamicCache, whose ``update`` replaces each layer's tensors in place.
def holds_previous_cache_while_decoding(software: Software) -> bool:
    return parse_version(software.transformers, "transformers") < (4, 36)


# Rule transformers4_rotary_caches: before these transformers versions every attention layer built
# its own rotary embedding with cos/sin tables of max_position_embeddings x head_dim, registered as
# buffers in the default dtype at init (the load dtype under from_pretrained(torch_dtype=...)):
# modeling_llama.py ``cos_cached`` (``_cos_cached`` from 4.38, gone in 4.41), modeling_mistral.py
# (gone in 4.42), modeling_qwen2.py and modeling_qwen2_moe.py (gone in 4.45, when the rotary
# embedding moved to one per model computing cos/sin on the fly). Checked in the 4.36.2-4.45.0 wheels.
PER_LAYER_ROTARY_CACHES_UNTIL = {"llama": (4, 41), "mistral": (4, 42), "qwen2": (4, 45), "qwen2_moe": (4, 45)}


def has_per_layer_rotary_caches(family: str, software: Software) -> bool:
    until = PER_LAYER_ROTARY_CACHES_UNTIL.get(family)
    return until is not None and parse_version(software.transformers, "transformers") < until


# Rule torch2_foreach_default: torch >= 2.0 runs AdamW's foreach implementation by default on CUDA
# (torch/optim/optimizer.py _default_to_fused_or_foreach); 1.x looped over parameters.
def foreach_by_default(software: Software) -> bool:
    return parse_version(software.torch, "torch") >= (2, 0)


# Rule torch2_zero_grad_set_to_none: since torch 2.0 ``zero_grad()`` frees gradients
# (set_to_none=True, torch/optim/optimizer.py and nn/modules/module.py); before, it zeroed them in
# place, so gradients stayed allocated through the next forward pass.
def frees_gradients_between_steps(software: Software) -> bool:
    return parse_version(software.torch, "torch") >= (2, 0)


# Rule torch113_lazy_loading: torch >= 1.13 sets CUDA_MODULE_LOADING=LAZY (pytorch/pytorch#86509),
# so the CUDA context loads kernels on first use; before, every kernel image was loaded at start-up.
def lazy_module_loading(software: Software) -> bool:
    return parse_version(software.torch, "torch") >= (1, 13)
