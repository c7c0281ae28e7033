"""Block activations against what autograd really saves: exact bytes per block, every family.

A tiny model of each family (transformers 5.24) runs one training forward on the CPU under
``torch.autograd.graph.saved_tensors_hooks``; every storage saved for backward is counted once,
parameters excluded. A model with two blocks minus the same model with one is one block's saved
bytes, which must equal ``LayerActivations.block_bytes`` exactly; where attention is eager,
masked or SDPA's math fallback, for two shapes with the same tokens, different keys per token and
batches of 2 and 1 (so per-token, per-key and per-position-pair terms, and batch-of-one views,
are told apart). The model is called as HF Trainer calls it: ``use_cache=False``
(trainer.py sets ``model.config.use_cache = args.use_cache``), under autocast when bf16 is on.

Where the CPU keeps something else than a CUDA GPU, the test keeps what the GPU keeps, each case
named here (the estimator models CUDA):
- autocast: CUDA's cast policy (app/calibration/cuda_autocast.py), not the CPU's;
- dropout: CUDA's fused ``native_dropout``, which saves a bool mask, where the CPU saves a noise
  tensor in the input's dtype (aten/src/ATen/native/Dropout.cpp ``is_fused_kernel_acceptable``);
- LayerNorm statistics: CUDA keeps mean and rstd in fp32 (acc_type), the CPU in a 16-bit
  input's dtype: counted at 4 bytes;
- SDPA with a mask that needs a gradient (T5's trained position bias): the CPU falls back to its
  math kernel, CUDA runs the memory-efficient kernel, which keeps q, k, v, the mask, the output and
  the log-sum-exp (derivatives.yaml ``_scaled_dot_product_efficient_attention``): emulated.
Autocast's cached 16-bit copies of fp32 weights are left out: phases.py counts them once per step.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from app.estimator.activations import block_activations  # noqa: E402
from app.estimator.architecture import NO_SDPA, read_architecture  # noqa: E402
from app.estimator.params import list_modules  # noqa: E402
from app.estimator.setup import DEFAULT_LORA_TARGETS, resolve_setup  # noqa: E402
from app.workload import Workload  # noqa: E402

# Tiny configs make transformers and PEFT warn (tied weights, vocabularies, unmatched patterns).
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

HIDDEN = {"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 100}
LLAMA = {"intermediate_size": 176, "num_key_value_heads": 2, **HIDDEN}
GPT = {"n_embd": 64, "n_head": 4, "vocab_size": 100, "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0}
T5 = {"d_model": 64, "d_kv": 16, "num_heads": 4, "d_ff": 176, "vocab_size": 100, "dropout_rate": 0.0, "decoder_start_token_id": 0, "pad_token_id": 0}
# Dropout probabilities are 0 except in the dropout cases; head_dim 16 and sequence lengths that are
# multiples of 32 keep every CUDA kernel on its unpadded path.
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", **LLAMA},
    "mistral": {"model_type": "mistral", **LLAMA},
    "qwen2": {"model_type": "qwen2", **LLAMA},
    "qwen3": {"model_type": "qwen3", "head_dim": 16, **LLAMA},
    "gemma": {"model_type": "gemma", "head_dim": 16, **LLAMA},
    "gemma2": {"model_type": "gemma2", "head_dim": 16, **LLAMA},
    "mixtral": {"model_type": "mixtral", "num_local_experts": 4, **LLAMA},
    "phi3": {"model_type": "phi3", "pad_token_id": 0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, **LLAMA},
    "qwen2_moe": {"model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                  "shared_expert_intermediate_size": 96, **LLAMA},
    "olmo": {"model_type": "olmo", "pad_token_id": 0, **LLAMA},
    "olmo_clip_qkv": {"model_type": "olmo", "pad_token_id": 0, "clip_qkv": 8.0, **LLAMA},
    "olmo2": {"model_type": "olmo2", "pad_token_id": 0, **LLAMA},
    "gpt2": {"model_type": "gpt2", **GPT},
    "gpt_bigcode": {"model_type": "gpt_bigcode", **GPT},
    "bert": {"model_type": "bert", "intermediate_size": 176, "attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": 0.0, **HIDDEN},
    "falcon": {"model_type": "falcon", "multi_query": True, "parallel_attn": True, "bos_token_id": 0, "eos_token_id": 0, **HIDDEN},
    "falcon_new_arch": {"model_type": "falcon", "new_decoder_architecture": True, "num_kv_heads": 2, "bos_token_id": 0, "eos_token_id": 0, **HIDDEN},
    "opt": {"model_type": "opt", "ffn_dim": 176, "dropout": 0.0, "max_position_embeddings": 256, "word_embed_proj_dim": 64, **HIDDEN},
    "opt_post_norm": {"model_type": "opt", "ffn_dim": 176, "dropout": 0.0, "max_position_embeddings": 256, "word_embed_proj_dim": 64,
                      "do_layer_norm_before": False, **HIDDEN},
    "bloom": {"model_type": "bloom", "n_embed": 64, "n_head": 4, "vocab_size": 100},
    "gpt_neox": {"model_type": "gpt_neox", "intermediate_size": 176, **HIDDEN},
    "phi": {"model_type": "phi", "intermediate_size": 176, "resid_pdrop": 0.0, "embd_pdrop": 0.0, **HIDDEN},
    "phi_qk_layernorm": {"model_type": "phi", "intermediate_size": 176, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "qk_layernorm": True, **HIDDEN},
    "t5": {"model_type": "t5", **T5},
    "mt5": {"model_type": "mt5", "feed_forward_proj": "gated-gelu", **T5},
}
DROPOUT = {
    "gpt2": {"attn_pdrop": 0.1, "resid_pdrop": 0.1}, "bert": {"attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1},
    "falcon": {"attention_dropout": 0.1, "hidden_dropout": 0.1}, "opt": {"dropout": 0.1, "attention_dropout": 0.1},
    "bloom": {"hidden_dropout": 0.1, "attention_dropout": 0.1}, "gpt_neox": {"attention_dropout": 0.1, "hidden_dropout": 0.1},
    "phi": {"attention_dropout": 0.1, "resid_pdrop": 0.1}, "phi3": {"attention_dropout": 0.1, "resid_pdrop": 0.1},
    "t5": {"dropout_rate": 0.1},
}  # fmt: skip
LAYERS = {"gpt2": "n_layer", "gpt_bigcode": "n_layer", "bloom": "n_layer", "t5": "num_layers", "mt5": "num_layers"}
ENCODER_DECODER = ("t5", "mt5")
SHAPES = ((2, 32), (1, 64))  # (batch, seq): 64 tokens each, 32 or 64 keys per token

# Training set-ups: Trainer bf16 on bf16 weights (autocast around them), a plain bf16 loop, fp32
# weights under bf16 autocast, LoRA on every linear layer and on PEFT's default targets (q and v,
# or the fused qkv projection; peft/utils/constants.py), with PEFT's fp32 adapters.
MODES: dict[str, dict[str, Any]] = {
    "bf16": {"dtype": "bfloat16", "bf16": True},
    "bf16_no_autocast": {"dtype": "bfloat16", "bf16": False},
    "amp": {"dtype": "float32", "bf16": True},
    "lora_all_linear": {"dtype": "bfloat16", "bf16": True, "lora": {"target_modules": "all-linear"}},
    "lora_default_targets": {"dtype": "bfloat16", "bf16": True, "lora": {"target_modules": "default"}},
    "eager": {"dtype": "bfloat16", "bf16": True, "attn": "eager"},
    "dropout": {"dtype": "bfloat16", "bf16": True, "attn": "eager", "dropout": True},
    "lora_dropout": {"dtype": "bfloat16", "bf16": True, "lora": {"target_modules": "all-linear", "lora_dropout": 0.1}},
    "amp_lora": {"dtype": "float32", "bf16": True, "lora": {"target_modules": "all-linear"}},
    "dora": {"dtype": "bfloat16", "bf16": True, "lora": {"target_modules": "all-linear", "use_dora": True}},
    "dora_no_autocast": {"dtype": "bfloat16", "bf16": False, "lora": {"target_modules": "all-linear", "use_dora": True}},
    "dora_dropout": {"dtype": "bfloat16", "bf16": True, "lora": {"target_modules": "all-linear", "use_dora": True, "lora_dropout": 0.1}},
    "dora_dropout_no_autocast": {"dtype": "bfloat16", "bf16": False,
                                 "lora": {"target_modules": "all-linear", "use_dora": True, "lora_dropout": 0.1}},
    # PEFT methods other than LoRA: IA3 (PEFT's default targets per family) and LN tuning
    "ia3": {"dtype": "bfloat16", "bf16": True, "peft": {"peft_type": "IA3"}},
    "ia3_no_autocast": {"dtype": "bfloat16", "bf16": False, "peft": {"peft_type": "IA3"}},
    "ln_tuning": {"dtype": "bfloat16", "bf16": False, "peft": {"peft_type": "LN_TUNING"}},
}
MAIN_MODES = ("bf16", "bf16_no_autocast", "amp", "lora_all_linear", "lora_default_targets")
# Eager attention, dropout masks, LoRA dropout and LoRA on fp32 weights under autocast, on one
# family per attention and MLP code path.
EXTRA_CASES = [
    (family, mode)
    for family in ("llama", "gpt2", "gpt_bigcode", "bert", "falcon", "opt", "bloom", "gpt_neox", "phi", "phi3", "t5")
    for mode in ("eager", "dropout", "lora_dropout", "amp_lora")
    if not (family == "bloom" and mode == "eager")  # BLOOM is eager in every case
] + [("mixtral", "amp_lora"), ("qwen2_moe", "amp_lora")] + [
    # DoRA (peft/tuners/lora/dora.py): with and without autocast and LoRA dropout; Conv1D (gpt2),
    # fused qkv (falcon, bloom), encoder (bert) and encoder-decoder (t5) layouts
    (family, mode)
    for family in ("llama", "gpt2", "falcon", "bert", "t5")
    for mode in ("dora", "dora_no_autocast", "dora_dropout", "dora_dropout_no_autocast")
] + [(family, mode) for family in ("llama", "gpt2", "falcon", "bert", "opt", "gpt_neox", "t5") for mode in ("ia3", "ia3_no_autocast")] + [
    # LN tuning on the families PEFT has default norm targets for (peft/utils/constants.py)
    (family, "ln_tuning") for family in ("llama", "gpt2", "falcon", "t5")
]
CASES = [(family, mode) for family in CONFIGS for mode in MAIN_MODES] + EXTRA_CASES


@pytest.mark.parametrize(("family", "mode"), CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_block_activations_equal_saved_tensors(catalog, family: str, mode: str) -> None:
    config = dict(CONFIGS[family])
    setting = MODES[mode]
    if setting.get("lora", {}).get("target_modules") == "default":
        # PEFT's own defaults, passed by name: PEFT 0.21 with target_modules=None finds no target on
        # transformers 5 Mixtral (its MoE config conversion runs first)
        setting = {**setting, "lora": {"target_modules": DEFAULT_LORA_TARGETS[config["model_type"]]}}
    if setting.get("dropout"):
        config.update(DROPOUT.get(config["model_type"], {"attention_dropout": 0.1}))
    if config["model_type"] in ENCODER_DECODER:
        _check_encoder_decoder(catalog, config, setting)
        return
    layers = LAYERS.get(config["model_type"], "num_hidden_layers")
    one, two = (_build({**config, layers: n}, setting) for n in (1, 2))
    # Per-key terms and batch-of-one views exist only in eager attention, SDPA with a mask or its math
    # fallback (Falcon); with SDPA's flash kernel one shape suffices.
    eager = setting.get("attn") == "eager" or config["model_type"] in NO_SDPA
    for batch, seq in SHAPES if eager or config["model_type"] == "falcon" else SHAPES[:1]:
        measured = _saved_bytes(two, setting, batch, seq) - _saved_bytes(one, setting, batch, seq)
        expected = _estimate(catalog, {**config, layers: 2}, setting, batch).block_bytes(batch, seq)
        assert measured == expected, f"{family} {mode} batch {batch} seq {seq}: {measured} saved, {expected} estimated"


def _check_encoder_decoder(catalog, config: dict[str, Any], setting: dict[str, Any]) -> None:
    """T5 shares its relative position bias across a stack: grow the encoder and the decoder
    separately; decoders read an encoder output of another length (per-encoder-token terms)."""
    base, encoder, decoder = (_build({**config, "num_layers": e, "num_decoder_layers": d}, setting) for e, d in ((1, 1), (2, 1), (1, 2)))
    for (batch, seq), (_, memory) in zip(SHAPES, reversed(SHAPES), strict=True):
        reference = _saved_bytes(base, setting, batch, seq, memory)
        measured = _saved_bytes(encoder, setting, batch, seq, memory) - reference
        expected = _estimate(catalog, {**config, "num_layers": 2}, setting, batch).block_bytes(batch, memory)
        assert measured == expected, f"{config['model_type']} encoder block, batch {batch} seq {memory}: {measured} saved, {expected} estimated"
        measured = _saved_bytes(decoder, setting, batch, seq, memory) - reference
        expected = _estimate(catalog, {**config, "num_layers": 2}, setting, batch, decoder=True).block_bytes(batch, seq, memory)
        assert measured == expected, f"{config['model_type']} decoder block, batch {batch} seq {seq}: {measured} saved, {expected} estimated"


def _estimate(catalog, config: dict[str, Any], setting: dict[str, Any], batch: int, decoder: bool = False):
    training = {"bf16": setting["bf16"], "per_device_train_batch_size": batch, "max_seq_length": 64, "gradient_checkpointing": False}
    if "attn" in setting:
        training["attn_implementation"] = setting["attn"]
    data: dict[str, Any] = {"model": {"config": config, "dtype": setting["dtype"]}, "training": training}
    if "lora" in setting:
        data["lora"] = {"r": 8, **setting["lora"]}
    if "peft" in setting:
        data["peft"] = setting["peft"]
    workload = Workload.model_validate(data)
    arch = read_architecture(config)
    modules = list_modules(arch, config)
    setup = resolve_setup(workload, arch, modules, catalog.gpu("A100-80GB"))
    return block_activations(arch, modules, setup, workload, setup.full_trainable, decoder=decoder)


# -- the measurement ---------------------------------------------------------------------------------
def _build(config: dict[str, Any], setting: dict[str, Any]) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    hf_config = AutoConfig.for_model(**config)
    hf_config.use_cache = False
    eager = setting.get("attn") == "eager" or config["model_type"] in NO_SDPA
    hf_config._attn_implementation = "eager" if eager else "sdpa"
    family = config["model_type"]
    model_class = {"bert": AutoModelForSequenceClassification, "t5": AutoModelForSeq2SeqLM, "mt5": AutoModelForSeq2SeqLM}.get(family, AutoModelForCausalLM)
    torch.manual_seed(0)
    model = model_class.from_config(hf_config, dtype=getattr(torch, setting["dtype"]))
    if "lora" in setting:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, **setting["lora"]))
    if "peft" in setting:
        from peft import IA3Config, LNTuningConfig, get_peft_model

        config_class = {"IA3": IA3Config, "LN_TUNING": LNTuningConfig}[setting["peft"]["peft_type"]]
        task = {"bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM", "mt5": "SEQ_2_SEQ_LM"}.get(family, "CAUSAL_LM")
        model = get_peft_model(model, config_class(task_type=task))
    return model.train()


def _saved_bytes(model: Any, setting: dict[str, Any], batch: int, seq: int, memory: int | None = None) -> int:
    """Bytes of the storages autograd saves in one forward (parameters and autocast's weight cache
    excluded), with CUDA's LayerNorm statistics."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    packed: list[tuple[weakref.ref[Any], int, int]] = []

    def pack(tensor: Any) -> Any:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            packed.append((weakref.ref(tensor), storage.data_ptr(), storage.nbytes()))
        return tensor

    generator = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(1, 100, (batch, memory or seq), generator=generator)}
    if memory is not None:
        inputs["decoder_input_ids"] = torch.randint(1, 100, (batch, seq), generator=generator)
    with _cuda_behaviour(setting["bf16"]) as weight_casts, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(**inputs).logits
    # only what a graph still holds once the forward is done: a graph that died inside it (DoRA's
    # lora_B(lora_A(eye)), of which only a detached copy is used) kept its tensors for a moment only
    saved = {key: nbytes for ref, key, nbytes in packed if ref() is not None}
    total = sum(nbytes for key, nbytes in saved.items() if key not in weight_casts)
    return total + _cuda_layer_norm_statistics(logits.grad_fn, saved)


@contextlib.contextmanager
def _cuda_behaviour(autocast: bool) -> Iterator[set[int]]:
    """CUDA's dropout, SDPA kernel choice and autocast policy; yields the storages of autocast's
    cached weight casts."""
    from app.calibration import cuda_autocast

    weight_casts: set[int] = set()
    original_cast = cuda_autocast._CastCache.cast

    def recording_cast(cache: Any, tensor: Any, dtype: Any) -> Any:
        out = original_cast(cache, tensor, dtype)
        hit = cache._casts.get(id(tensor))
        if hit is not None and hit[1] is out:
            weight_casts.add(out.untyped_storage().data_ptr())
        return out

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(torch.nn.functional, "dropout", _native_dropout))
        stack.enter_context(_patched(torch.nn.functional, "scaled_dot_product_attention", _efficient_sdpa_for_trained_masks))
        stack.enter_context(_patched(cuda_autocast._CastCache, "cast", recording_cast))
        if autocast:
            stack.enter_context(cuda_autocast.cuda_autocast_policy())
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        yield weight_casts


def _native_dropout(input: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
    """F.dropout as CUDA runs it: native_dropout, which keeps a bool mask."""
    if not training or p == 0.0:
        return input
    return torch.native_dropout(input, p, True)[0]


_SDPA = torch.nn.functional.scaled_dot_product_attention


class _EfficientAttention(torch.autograd.Function):
    """Keeps what CUDA's memory-efficient kernel keeps: q, k, v, the mask, output, log-sum-exp."""

    @staticmethod
    def forward(ctx: Any, query: Any, key: Any, value: Any, mask: Any, scale: Any) -> Any:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False, attn_mask=mask, scale=scale)
        ctx.save_for_backward(query, key, value, mask, out, lse)
        return out


def _efficient_sdpa_for_trained_masks(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is None or not attn_mask.requires_grad:
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if torch.is_autocast_enabled("cpu"):  # aten::scaled_dot_product_attention is in CUDA's 16-bit list
        low = torch.get_autocast_dtype("cpu")
        query, key, value, attn_mask = (t.to(low) for t in (query, key, value, attn_mask))
    return _EfficientAttention.apply(query, key, value, attn_mask, scale)


def _cuda_layer_norm_statistics(root: Any, saved: dict[int, int]) -> int:
    """Extra bytes of fp32 mean/rstd where the CPU saved them in a 16-bit input's dtype."""
    extra, todo, seen = 0, [root], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "NativeLayerNormBackward0":
            for stat in (node._saved_result1, node._saved_result2):
                if stat.element_size() == 2 and stat.untyped_storage().data_ptr() in saved:
                    extra += stat.numel() * 2
        todo.extend(next_node for next_node, _ in node.next_functions)
    return extra


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)
