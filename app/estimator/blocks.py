"""One block of each decoder family, written as transformers 5.24 runs it, for blocks_ops.

Each function follows the forward of ``models/<family>/modeling_<family>.py`` (the decoder layer,
its attention and its MLP) and records, through the operators of blocks_ops, what autograd
keeps. Linear layers carry the names of params.py, so LoRA targets resolve as in setup.py.
MoE blocks are in blocks_moe.py, T5's in blocks_t5.py.
"""

from __future__ import annotations

from collections.abc import Callable

from app.estimator.architecture import Architecture
from app.estimator.blocks_ops import (
    FP32,
    INT64,
    Axis,
    Part,
    Tape,
    Tensor,
    activation,
    cast,
    dropout,
    eager_attention,
    heads_last,
    layer_norm,
    linear,
    lowered,
    multiply,
    promote,
    rms_norm,
    rope,
    sdpa,
    sdpa_math,
    view,
)


def attend(tape: Tape, arch: Architecture, q: Tensor, k: Tensor, v: Tensor, *, softmax_size: int | None = FP32,
           mask: Tensor | None = None, dropout_p: float | None = None) -> Tensor:
    """SDPA or eager attention (the kernel ``resolve_attention`` picked); the output in (batch, seq,
    hidden) order, as ``transpose(1, 2).contiguous()`` or ``reshape`` leave it for the out-projection."""
    if tape.rules.sdpa and tape.rules.prefix_tokens and mask is None:
        out = _sdpa_after_prefix(tape, arch, q, k, v)
    elif tape.rules.sdpa:
        out = sdpa(tape, q, k, v, arch.num_heads, mask=mask)
    else:
        out = eager_attention(tape, q, k, v, arch.num_heads, arch.num_kv_heads, softcap=bool(arch.attn_logit_softcapping), softmax_size=softmax_size, dropout_p=dropout_p)
    return heads_last(tape, out)


def _sdpa_after_prefix(tape: Tape, arch: Architecture, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA behind PEFT prefix tuning's past keys and values (``memory_len`` = the virtual tokens):
    the cache concatenates them before this layer's keys and values; the query no longer spans
    every key, so transformers builds a mask (per layer, in the query's dtype: masking_utils.py,
    sdpa_attention.py), which sends SDPA to its memory-efficient kernel and, a mask being present,
    makes ``repeat_kv`` copy keys and values to every query head (``use_gqa_in_sdpa`` needs no mask)."""
    heads_width = arch.q_dim
    size = lowered(tape, k).size
    keys = tape.new(heads_width, size, like=k, heads_first=True, storage_width=0.0)
    values = tape.new(heads_width, size, like=v, heads_first=True, storage_width=0.0)
    tape.save(tape.new(heads_width, size, axis=Axis.memory), tape.new(heads_width, size, axis=Axis.memory))  # their prefix rows
    tape.save(tape.new(1, tape.rules.compute_size, axis=Axis.memory_key))  # the mask's prefix columns
    return sdpa(tape, q, keys, values, arch.num_heads, mask=tape.new(1, tape.rules.compute_size, axis=Axis.key))


def residual(tape: Tape, a: Tensor, b: Tensor) -> Tensor:
    """``a + b`` saves nothing; the sum has the wider dtype (fp32 residual + 16-bit branch)."""
    return tape.new(a.width, promote(a.size, b.size), like=a, heads_first=False, storage_width=0.0)


def gated_mlp(tape: Tape, arch: Architecture, x: Tensor, width: int, prefix: str = "") -> Tensor:
    """``down(act(gate(x)) * up(x))`` (LlamaMLP); Phi-3 fuses gate and up (Phi3MLP: chunk views)."""
    if arch.family == "phi3":
        fused = linear(tape, x, "gate_up_proj", 2 * width)
        gate, up = view(fused, width), view(fused, width)
    else:
        gate, up = linear(tape, x, prefix + "gate_proj", width), linear(tape, x, prefix + "up_proj", width)
    return linear(tape, multiply(tape, activation(tape, gate, arch.hidden_act), up), prefix + "down_proj", arch.hidden_size)


def mlp(tape: Tape, arch: Architecture, x: Tensor, up: str, down: str, weight_view: bool = False) -> Tensor:
    """``down(act(up(x)))`` (GPT-2, BERT, Falcon, OPT, BLOOM, GPT-NeoX, Phi)."""
    inner = activation(tape, linear(tape, x, up, arch.intermediate_size, weight_view=weight_view), arch.hidden_act)
    return linear(tape, inner, down, arch.hidden_size, weight_view=weight_view)


# -- llama family ----------------------------------------------------------------------------------
_NORM_STYLE = {"gemma": "gemma", "gemma2": "gemma", "olmo2": "olmo2"}


def _norm(tape: Tape, arch: Architecture, x: Tensor) -> Tensor:
    with tape.section(Part.norms):
        if arch.family == "olmo":  # OlmoLayerNorm: F.layer_norm(x.float(), no weight).to(x.dtype)
            return cast(tape, layer_norm(tape, cast(tape, x, FP32), affine=False), x.size)
        return rms_norm(tape, x, _NORM_STYLE.get(arch.family, "llama"))


def _llama_qkv(tape: Tape, arch: Architecture, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    q_dim, kv_dim = arch.q_dim, arch.kv_dim
    if arch.family == "phi3":  # Phi3Attention: slices of one qkv_proj output
        qkv = linear(tape, x, "qkv_proj", q_dim + 2 * kv_dim)
        return view(qkv, q_dim), view(qkv, kv_dim), view(qkv, kv_dim)
    q, k, v = (linear(tape, x, name, width) for name, width in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)))
    if arch.clip_qkv is not None:  # OlmoAttention: clamp_ in place keeps a copy of each input
        for t in (q, k, v):
            tape.save(tape.new(t.width, t.size, like=t))
    if arch.family == "olmo2":  # Olmo2Attention: q_norm/k_norm over the whole projection
        with tape.section(Part.norms):
            q, k = rms_norm(tape, q, "olmo2"), rms_norm(tape, k, "olmo2")
    if arch.family == "qwen3":  # Qwen3Attention: q_norm/k_norm per head
        with tape.section(Part.norms):
            q, k = rms_norm(tape, q, "llama", arch.num_heads), rms_norm(tape, k, "llama", arch.num_kv_heads)
    return q, k, v


def llama_block(tape: Tape, arch: Architecture, x: Tensor, moe_block: Callable[[Tape, Architecture, Tensor], Tensor] | None = None) -> Tensor:
    """LlamaDecoderLayer and its relatives: pre-norms (Gemma-2 adds post-norms, OLMo-2 has only
    post-norms), RoPE, attention, a gated MLP or an MoE block (``moe_block``)."""
    post_norms = arch.family in ("gemma2", "olmo2")
    h = x if arch.family == "olmo2" else _norm(tape, arch, x)
    q, k, v = _llama_qkv(tape, arch, h)
    concatenated = arch.family == "phi3"  # apply_rotary_pos_emb: torch.cat([q_rot, q_pass])
    q, k = rope(tape, q, x.size, concatenated=concatenated), rope(tape, k, x.size, concatenated=concatenated)
    out = linear(tape, attend(tape, arch, q, k, v), "o_proj", arch.hidden_size)
    out = _norm(tape, arch, out) if post_norms else out
    x = residual(tape, x, dropout(tape, out, arch.hidden_dropout))
    h = x if arch.family == "olmo2" else _norm(tape, arch, x)
    with tape.section(Part.mlp):
        out = moe_block(tape, arch, h) if moe_block else gated_mlp(tape, arch, h, arch.intermediate_size)
    out = _norm(tape, arch, out) if post_norms else out
    return residual(tape, x, dropout(tape, out, arch.hidden_dropout))


def _pre_norm_mlp_after(tape: Tape, arch: Architecture, x: Tensor, attn_out: Tensor, up: str, down: str) -> Tensor:
    """The second half of a sequential pre-norm block (GPT-2, BLOOM): the attention output (dropout)
    added to the residual, LayerNorm, the MLP (dropout) added again."""
    x = residual(tape, x, dropout(tape, attn_out, arch.hidden_dropout))
    with tape.section(Part.norms):
        h = layer_norm(tape, x)
    with tape.section(Part.mlp):
        out = mlp(tape, arch, h, up, down)
    return residual(tape, x, dropout(tape, out, arch.hidden_dropout))


# -- GPT-2, GPT-BigCode -----------------------------------------------------------------------------
def gpt2_block(tape: Tape, arch: Architecture, x: Tensor) -> Tensor:
    """GPT2Block / GPTBigCodeBlock: c_attn's output split into q, k, v views (SDPA keeps it whole
    through them), c_proj, two residual dropouts; eager softmax in the scores' dtype (GPT-2)."""
    with tape.section(Part.norms):
        h = layer_norm(tape, x)
    qkv = linear(tape, h, "c_attn", arch.q_dim + 2 * arch.kv_dim)
    q, k, v = view(qkv, arch.q_dim), view(qkv, arch.kv_dim), view(qkv, arch.kv_dim)
    out = attend(tape, arch, q, k, v, softmax_size=None if arch.family == "gpt2" else FP32)
    return _pre_norm_mlp_after(tape, arch, x, linear(tape, out, "attn.c_proj", arch.hidden_size), "c_fc", "mlp.c_proj")


# -- BERT --------------------------------------------------------------------------------------------
def bert_block(tape: Tape, arch: Architecture, x: Tensor) -> Tensor:
    """BertLayer (post-norm): attention, dense, dropout, LayerNorm(out + x); intermediate, output,
    dropout, LayerNorm. The block input is the previous block's LayerNorm output."""
    q, k, v = (linear(tape, x, name, arch.hidden_size) for name in ("query", "key", "value"))
    out = linear(tape, attend(tape, arch, q, k, v, softmax_size=None), "attention.output.dense", arch.hidden_size)
    with tape.section(Part.norms):
        x = layer_norm(tape, residual(tape, dropout(tape, out, arch.hidden_dropout), x))
    with tape.section(Part.mlp):
        out = mlp(tape, arch, x, "intermediate.dense", "output.dense")
    with tape.section(Part.norms):
        return layer_norm(tape, residual(tape, dropout(tape, out, arch.hidden_dropout), x))


# -- Falcon ------------------------------------------------------------------------------------------
def falcon_block(tape: Tape, arch: Architecture, x: Tensor) -> Tensor:
    """FalconDecoderLayer. query_key_value is split by ``_split_heads``: Falcon-7B (multi-query)
    slices q and indexes k and v (copies, and two saved index tensors); the new decoder
    architecture broadcasts k and v to every head and flattens (copies of all three). The model
    always materializes its causal mask (``allow_is_causal_skip=False``), which SDPA converts from
    bool per call and the memory-efficient kernel keeps; heads that differ without ``enable_gqa``
    send SDPA to its math fallback."""
    new_arch, parallel = arch.new_decoder_architecture, arch.parallel_attn
    two_norms = new_arch and arch.norms_per_layer == 2
    with tape.section(Part.norms):
        h_attn = layer_norm(tape, x)
        h_mlp = layer_norm(tape, x) if two_norms else h_attn
    qkv = linear(tape, h_attn, "query_key_value", arch.q_dim + 2 * arch.kv_dim, weight_view=True)
    tape.save_constant(2 * INT64)  # qkv[..., [-2], :] and qkv[..., [-1], :] keep their index tensors
    if new_arch:
        q, k, v = (tape.new(arch.q_dim, qkv.size, like=qkv) for _ in range(3))
    else:
        q, k, v = view(qkv, arch.q_dim), tape.new(arch.kv_dim, qkv.size, like=qkv), tape.new(arch.kv_dim, qkv.size, like=qkv)
    q, k = rope(tape, q, x.size), rope(tape, k, x.size)
    if tape.rules.flash_package:  # FalconFlashAttention2: no mask, multi-query handled by the kernel
        out = attend(tape, arch, q, k, v)
    elif tape.rules.sdpa and k.width != q.width:
        out = heads_last(tape, sdpa_math(tape, q, k, v, arch.num_heads))
    elif tape.rules.sdpa:
        mask = tape.new(1, tape.rules.compute_size if tape.rules.autocast else q.size, axis=Axis.key)
        out = attend(tape, arch, q, k, v, mask=mask)
    else:  # FalconAttention's rotary eager path: softmax in the hidden dtype, no dropout, k and v broadcast
        out = heads_last(tape, eager_attention(tape, q, k, v, arch.num_heads, arch.num_kv_heads, softmax_size=x.size, dropout_p=0.0, repeat_kv=False))
    out = linear(tape, out, "dense", arch.hidden_size, weight_view=True)
    if not (new_arch or parallel):
        x = residual(tape, x, dropout(tape, out, arch.attention_dropout))
        with tape.section(Part.norms):
            h_mlp = layer_norm(tape, x)
    with tape.section(Part.mlp):
        mlp_out = mlp(tape, arch, h_mlp, "dense_h_to_4h", "dense_4h_to_h", weight_view=True)
    return residual(tape, x, dropout(tape, mlp_out, arch.hidden_dropout))


# -- OPT ---------------------------------------------------------------------------------------------
def opt_block(tape: Tape, arch: Architecture, x: Tensor) -> Tensor:
    """OPTDecoderLayer, pre-norm (``do_layer_norm_before``) or post-norm (OPT-350m)."""
    pre = arch.do_layer_norm_before
    with tape.section(Part.norms):
        h = layer_norm(tape, x) if pre else x
    q = tape.new(arch.q_dim, tape.rules.compute_size, like=linear(tape, h, "q_proj", arch.q_dim))  # q_proj(x) * scaling
    k, v = linear(tape, h, "k_proj", arch.kv_dim), linear(tape, h, "v_proj", arch.kv_dim)
    out = linear(tape, attend(tape, arch, q, k, v), "out_proj", arch.hidden_size)
    x = residual(tape, x, dropout(tape, out, arch.hidden_dropout))
    with tape.section(Part.norms):
        x = x if pre else layer_norm(tape, x)
        h = layer_norm(tape, x) if pre else x
    with tape.section(Part.mlp):
        out = mlp(tape, arch, h, "fc1", "fc2")
    x = residual(tape, x, dropout(tape, out, arch.hidden_dropout))
    if not pre:
        with tape.section(Part.norms):
            x = layer_norm(tape, x)
    return x


# -- BLOOM -------------------------------------------------------------------------------------------
def bloom_block(tape: Tape, arch: Architecture, x: Tensor) -> Tensor:
    """BloomBlock (eager only): q, k, v reshaped out of query_key_value to (batch x heads, ...)
    (copies), ``alibi.baddbmm(q, k^T)`` saves both, fp32 softmax, 16-bit probabilities, the
    merged heads (a copy) into dense; GeLUFunction saves its input."""
    with tape.section(Part.norms):
        h = layer_norm(tape, x)
    qkv = linear(tape, h, "query_key_value", 3 * arch.hidden_size)
    q, k, v = (tape.new(arch.q_dim, qkv.size, like=qkv, heads_first=True) for _ in range(3))
    tape.save(q, k, v)
    out = eager_attention(tape, q, k, v, arch.num_heads, arch.num_heads)
    out = linear(tape, heads_last(tape, out), "dense", arch.hidden_size)
    return _pre_norm_mlp_after(tape, arch, x, out, "dense_h_to_4h", "dense_4h_to_h")


# -- GPT-NeoX ----------------------------------------------------------------------------------------
def gpt_neox_block(tape: Tape, arch: Architecture, x: Tensor) -> Tensor:
    """GPTNeoXLayer: q, k, v are chunks of one query_key_value output; partial RoPE concatenates q
    and k (heads first); v stays a view, so SDPA keeps the whole qkv output. Parallel residual
    (default): both norms read the block input."""
    with tape.section(Part.norms):
        h = layer_norm(tape, x)
    qkv = linear(tape, h, "query_key_value", 3 * arch.hidden_size)
    q, k = (rope(tape, view(qkv, arch.q_dim), x.size, concatenated=True) for _ in range(2))
    out = linear(tape, attend(tape, arch, q, k, view(qkv, arch.kv_dim)), "dense", arch.hidden_size)
    out = dropout(tape, out, arch.hidden_dropout)
    if not arch.parallel_attn:
        x = residual(tape, x, out)
    with tape.section(Part.norms):
        h = layer_norm(tape, x)
    with tape.section(Part.mlp):
        mlp_out = dropout(tape, mlp(tape, arch, h, "dense_h_to_4h", "dense_4h_to_h"), arch.hidden_dropout)
    return residual(tape, residual(tape, mlp_out, out), x)


# -- Phi ---------------------------------------------------------------------------------------------
def phi_block(tape: Tape, arch: Architecture, x: Tensor) -> Tensor:
    """PhiDecoderLayer: one LayerNorm feeds attention and MLP in parallel; optional per-head q/k
    LayerNorms; partial RoPE concatenated (q, k heads first)."""
    with tape.section(Part.norms):
        h = layer_norm(tape, x)
    q, k, v = (linear(tape, h, name, width) for name, width in (("q_proj", arch.q_dim), ("k_proj", arch.kv_dim), ("v_proj", arch.kv_dim)))
    if arch.qk_layernorm:
        with tape.section(Part.norms):
            q, k = layer_norm(tape, q, groups=arch.num_heads), layer_norm(tape, k, groups=arch.num_kv_heads)
    q, k = rope(tape, q, x.size, concatenated=True), rope(tape, k, x.size, concatenated=True)
    out = dropout(tape, linear(tape, attend(tape, arch, q, k, v), "dense", arch.hidden_size), arch.hidden_dropout)
    with tape.section(Part.mlp):
        mlp_out = dropout(tape, mlp(tape, arch, h, "fc1", "fc2"), arch.hidden_dropout)
    return residual(tape, residual(tape, out, mlp_out), x)
