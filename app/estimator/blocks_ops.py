"""What autograd saves for backward, operator by operator, as a block runs on a CUDA GPU.

A block is traced symbolically: a :class:`Tensor` is a width (elements per token) and an element
size; each operator below records the tensors its backward keeps and returns its output. A
storage saved by several operators (the normed input of q, k and v; a fused qkv output that the
attention keeps through its value view) is counted once. The rules are those of torch 2.13's
``tools/autograd/derivatives.yaml`` (which inputs or results a formula uses, and only for the
inputs that need a gradient) and of CUDA's autocast policy (aten/src/ATen/autocast_mode.cpp:
matmuls and SDPA cast their inputs to 16 bits, a copy per operator call; ``pow``, ``rsqrt``,
``layer_norm`` run in fp32; other operators keep their inputs' dtype).

Left out: kernel scratch space, the flash kernel's two RNG-state tensors (24 bytes per call), the
memory-efficient kernel's log-sum-exp padding to a multiple of 32 positions, allocator rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import StrEnum

FP32 = 4
BOOL = 1
INT32 = 4
INT64 = 8


class Part(StrEnum):
    norms = "norms"
    attention = "attention"
    mlp = "mlp"
    lora = "lora"
    dropout = "dropout"


class Axis(StrEnum):
    """What a tensor's width multiplies."""

    token = "token"  # tokens of the block's own sequence
    key = "key"  # tokens x keys of the block's own sequence (attention scores)
    memory = "memory"  # encoder tokens (cross-attention keys and values)
    memory_key = "memory_key"  # tokens x encoder positions (cross-attention scores)
    pair = "pair"  # query positions x key positions, shared by the batch (T5 position-bias masks)


@dataclass(frozen=True)
class Tensor:
    """A tensor of ``width`` elements of ``size`` bytes per unit of ``axis``.

    ``key`` names its storage; a view shares its base's key and storage width. ``heads_first``
    marks attention tensors laid out (batch, heads, seq, dim) in memory, for which the kernels'
    outputs and transformers' ``transpose(1, 2).contiguous()`` make copies.
    """

    key: int
    width: float
    size: int
    axis: Axis = Axis.token
    storage_width: float = 0.0
    heads_first: bool = False

    @property
    def stored(self) -> float:
        return (self.storage_width or self.width) * self.size


@dataclass(frozen=True)
class LoraRules:
    targets: tuple[str, ...]
    rank: int
    adapter_size: int
    dropout: float
    cast_input: bool = True  # False: bitsandbytes LoRA layers under autocast keep x's dtype (peft/tuners/lora/bnb.py)
    dora: bool = False  # DoRA: the magnitude rescales base and LoRA outputs (peft/tuners/lora/dora.py DoraLinearLayer)


@dataclass(frozen=True)
class Ia3Rules:
    """IA3 (peft/tuners/ia3/layer.py Linear.forward): learned vectors scale the outputs of ``targets``
    (``base(x) * l``) and the inputs of ``feedforward`` modules (``x.to(l.dtype) * l``)."""

    targets: tuple[str, ...]
    feedforward: tuple[str, ...]
    vector_size: int = FP32  # PEFT autocasts adapter weights to fp32 (autocast_adapter_dtype=True)


@dataclass(frozen=True)
class Rules:
    """What the run decides for every operator of a block."""

    compute_size: int  # bytes of the matmul dtype (16-bit under autocast)
    autocast: bool  # the forward runs under torch.autocast (Trainer bf16/fp16)
    trainable: bool  # the block's own weights train (full fine-tuning)
    weight_size: int  # bytes of unquantized weights (norms, biases)
    linear_weight_size: float = 2  # bytes of the linear layers' weights (under 1 when quantized)
    lora: LoraRules | None = None
    sdpa: bool = True  # SDPA/flash kernels; False: eager attention
    flash_package: bool = False  # attn_implementation flash_attention_2/3 (the flash-attn package)
    batch_one: bool = False  # micro-batches of one sequence (reshapes that merge batch and heads stay views)
    attention_dropout: float = 0.0
    bnb_bits: int = 0  # 4 or 8: the block's linear layers are bitsandbytes Linear4bit/Linear8bitLt
    ia3: Ia3Rules | None = None
    prefix_tokens: int = 0  # prefix tuning: past keys and values of this many virtual tokens in every layer
    norms_train: bool = False  # LN tuning: (copies of) the norms train while the rest is frozen


@dataclass
class Tape:
    """The storages one block saves, each once, by part and axis, plus fixed bytes per block."""

    rules: Rules
    part: Part = Part.attention
    saved: dict[int, tuple[Part, Tensor]] = field(default_factory=dict)
    outside: set[int] = field(default_factory=set)  # tensors of the whole stack, counted elsewhere
    # saved on ctx attributes rather than save_for_backward: invisible to the saved-tensor hooks
    # that non-reentrant checkpointing drops tensors with, so kept for every block
    unhooked: set[int] = field(default_factory=set)
    output_size: int = 0  # element size of the block's output
    constant: dict[Part, float] = field(default_factory=dict)
    _count: int = 0

    def new(self, width: float, size: int, like: Tensor | None = None, **changes: object) -> Tensor:
        self._count += 1
        base = {"axis": like.axis, "heads_first": like.heads_first} if like is not None else {}
        return Tensor(key=self._count, width=width, size=size, **{**base, **changes})

    def shared(self, width: float, size: int, axis: Axis = Axis.token) -> Tensor:
        """A tensor that every block of the stack reads (the encoder output): never counted here."""
        tensor = self.new(width, size, axis=axis)
        self.outside.add(tensor.key)
        return tensor

    def save(self, *tensors: Tensor, part: Part | None = None) -> None:
        for tensor in tensors:
            if tensor.key not in self.outside:
                self.saved.setdefault(tensor.key, (part or self.part, tensor))

    def save_constant(self, nbytes: float, part: Part | None = None) -> None:
        owner = part or self.part
        self.constant[owner] = self.constant.get(owner, 0.0) + nbytes

    @contextmanager
    def section(self, part: Part) -> Iterator[None]:
        previous, self.part = self.part, part
        try:
            yield
        finally:
            self.part = previous

    def unhooked_per_token(self) -> float:
        """Bytes per token of the saved tensors that checkpointing cannot drop."""
        return sum(tensor.stored for key, (_, tensor) in self.saved.items() if key in self.unhooked and tensor.axis is Axis.token)

    def totals(self) -> dict[tuple[Part, Axis], float]:
        out: dict[tuple[Part, Axis], float] = {}
        for part, tensor in self.saved.values():
            out[(part, tensor.axis)] = out.get((part, tensor.axis), 0.0) + tensor.stored
        return out


def view(base: Tensor, width: float, **changes: object) -> Tensor:
    """A view into ``base`` (a slice, split, transpose): saving it keeps all of ``base``."""
    return replace(base, width=width, storage_width=base.storage_width or base.width, **changes)


def cast(tape: Tape, x: Tensor, size: int) -> Tensor:
    """``x.to(dtype)``: the same tensor when the dtype already matches, else a copy."""
    return x if x.size == size else tape.new(x.width, size, like=x, heads_first=x.heads_first)


def promote(*sizes: int) -> int:
    return max(sizes)


def lowered(tape: Tape, x: Tensor) -> Tensor:
    """The input a 16-bit autocast operator (matmul, linear, SDPA) computes with: a per-call copy."""
    return cast(tape, x, tape.rules.compute_size) if tape.rules.autocast else x


def fp32_policy(tape: Tape, x: Tensor) -> Tensor:
    """The input of an fp32-policy operator under autocast (``pow``, ``layer_norm``, ...)."""
    return cast(tape, x, FP32) if tape.rules.autocast else x


# -- linear layers ---------------------------------------------------------------------------
def linear(tape: Tape, x: Tensor, name: str, out_width: float, *, weight_view: bool = False) -> Tensor:
    """``nn.Linear``/``Conv1D``/``FalconLinear``: mm/addmm on a 2-D view saves its input when the
    weight trains; a frozen weight saves nothing. LoRA adds its own branch (PEFT lora.Linear).

    Under autocast an fp32 weight is cast to 16 bits and the copy kept for the input's gradient.
    Autocast caches the cast of a leaf weight that trains (counted once per step in phases.py);
    the cast of a frozen weight, or of a view (FalconLinear's ``input @ self.weight.T``), is a
    new copy per call (autocast_mode.cpp ``cached_cast``), counted here."""
    rules = tape.rules
    ia3 = rules.ia3
    if ia3 is not None and name in ia3.feedforward:
        x = _ia3_scaled_input(tape, x, ia3)
    out = _bnb_linear(tape, x, name, out_width) if rules.bnb_bits else _dense_linear(tape, x, name, out_width, weight_view)
    if ia3 is not None and name in ia3.targets and name not in ia3.feedforward:
        # ``(base(x) * l).to(result dtype)``: the product keeps the base output for l's gradient and
        # ``1 * l.flatten()`` (a new vector each call) for the output's
        with tape.section(Part.lora):
            tape.save(out)
            tape.save_constant(out_width * ia3.vector_size)
        return tape.new(out.width, out.size, like=out)
    return out


def _ia3_scaled_input(tape: Tape, x: Tensor, ia3: Ia3Rules) -> Tensor:
    """``(x.to(l.dtype) * l).to(x.dtype)``: the product keeps its (cast) input for l's gradient and
    the vector ``1 * l.flatten()`` for the input's."""
    with tape.section(Part.lora):
        xl = cast(tape, x, ia3.vector_size)
        tape.save(xl)
        tape.save_constant(x.width * ia3.vector_size)
    return cast(tape, tape.new(x.width, promote(xl.size, ia3.vector_size), like=x), x.size)


def _dense_linear(tape: Tape, x: Tensor, name: str, out_width: float, weight_view: bool) -> Tensor:
    rules = tape.rules
    xin = lowered(tape, x)
    if rules.trainable:
        tape.save(xin)
    if rules.autocast and rules.linear_weight_size > rules.compute_size and (weight_view or not rules.trainable):
        tape.save_constant(x.width * out_width * rules.compute_size)
    out = tape.new(out_width, rules.compute_size, like=x, heads_first=False, storage_width=0.0)
    if rules.lora is not None and name in rules.lora.targets:
        return _lora_branch(tape, x, out)
    return out


def _bnb_linear(tape: Tape, x: Tensor, name: str, out_width: float) -> Tensor:
    """bitsandbytes Linear4bit/Linear8bitLt (bitsandbytes/nn/modules.py): the input cast to the
    compute dtype for the matmul and the output cast back to the input's dtype (fp32 hidden states
    after prepare_model_for_kbit_training stay fp32). MatMul4Bit saves no input (autograd/
    _functions.py: ``ctx.tensors = (None, B)``); MatMul8bitLt keeps the input itself for the
    input's gradient (``ctx.tensors = (CAt, subA, A)``, CAt and subA None for a frozen weight
    without outliers)."""
    if tape.rules.bnb_bits == 8:
        tape.save(x)
        tape.unhooked.add(x.key)  # ``ctx.tensors = (CAt, subA, A)``: not save_for_backward
    out = tape.new(out_width, x.size, like=x, heads_first=False, storage_width=0.0)
    if tape.rules.lora is not None and name in tape.rules.lora.targets:
        return _lora_branch(tape, x, out)
    return out


def _lora_branch(tape: Tape, x: Tensor, base_out: Tensor) -> Tensor:
    """``lora_B(lora_A(dropout(x.to(adapter dtype))))``: lora_A saves its (cast) input, lora_B
    lora_A's output (peft/tuners/lora/layer.py Linear.forward, ``_cast_input_dtype``). The layer
    returns ``(result + lora) .to(result dtype)``: a new tensor of the base output's shape and dtype."""
    lora = tape.rules.lora
    assert lora is not None
    with tape.section(Part.lora):
        xa = cast(tape, x, lora.adapter_size) if lora.cast_input else x
        xa = dropout(tape, xa, lora.dropout, part=Part.lora)
        a_in = lowered(tape, xa)
        tape.save(a_in)
        a_out = tape.new(lora.rank, tape.rules.compute_size if tape.rules.autocast else lora.adapter_size, like=x)
        tape.save(lowered(tape, a_out))
        if lora.dora:
            _dora(tape, x.width, xa, base_out)
    return tape.new(base_out.width, base_out.size, like=base_out)


def _dora(tape: Tape, in_width: float, xa: Tensor, base_out: Tensor) -> None:
    """What DoRA saves beyond LoRA (peft/tuners/lora/dora.py ``DoraLinearLayer.forward``, with
    variants.py ``DoraLinearVariant``): ``weight_norm`` (detached; kept by the division
    ``magnitude / weight_norm``), ``mag_norm_scale`` and ``mag_norm_scale - 1`` (kept by the two
    products), the LoRA output ``lora_B(lora_A(x))`` (kept by ``mag_norm_scale * lora_result``) and
    the base result (kept by ``(mag_norm_scale - 1) * base_result``): the base layer's own output
    without dropout, else ``F.linear(dropout(x), weight.to(x.dtype))`` computed again, which also
    keeps its weight. ``lora_weight = lora_B(lora_A(eye)).T`` and the norm's sums are transients
    (their graph dies with the forward call: only ``lora_weight.detach()`` is used)."""
    rules, lora = tape.rules, tape.rules.lora
    assert lora is not None
    out_width = base_out.width
    scale_size = promote(lora.adapter_size, xa.size)  # magnitude (adapter dtype) / weight_norm (x's dtype)
    tape.save_constant(out_width * (xa.size + 2 * scale_size))
    tape.save(tape.new(out_width, rules.compute_size if rules.autocast else lora.adapter_size, like=xa))
    if lora.dropout <= 0:
        tape.save(base_out)
        return
    tape.save_constant(in_width * out_width * _dora_weight_size(rules, xa.size))
    tape.save(tape.new(out_width, rules.compute_size if rules.autocast else xa.size, like=xa))


def _dora_weight_size(rules: Rules, x_size: int) -> int:
    """Bytes per element of the weight DoRA's recomputed ``F.linear`` keeps: none when that is the
    frozen parameter itself, else the dequantized or cast copy (a new one per call: autocast caches
    only casts of weights that train)."""
    if rules.autocast and x_size != rules.compute_size:
        return rules.compute_size
    is_parameter = not rules.bnb_bits and rules.linear_weight_size == x_size
    return 0 if is_parameter else x_size


def dropout(tape: Tape, x: Tensor, p: float, part: Part | None = Part.dropout) -> Tensor:
    """CUDA's fused ``native_dropout`` saves a bool mask (derivatives.yaml: ``result1``)."""
    if p <= 0:
        return x
    tape.save(tape.new(x.width, BOOL, like=x), part=part)
    return tape.new(x.width, x.size, like=x)


# -- norms -------------------------------------------------------------------------------------
def rms_norm(tape: Tape, x: Tensor, style: str, groups: int = 1) -> Tensor:
    """RMSNorm as each family writes it (``groups``: statistics per token, e.g. per-head q/k norms).

    llama: ``weight * (x.float() * rsqrt(mean(x.float()^2))).to(x.dtype)`` (LlamaRMSNorm);
    gemma: ``(x.float() * rsqrt(...)) * (1 + weight.float())`` then ``type_as(x)`` (GemmaRMSNorm);
    olmo2: ``(weight * (x.float() * rsqrt(...))).to(x.dtype)`` (Olmo2RMSNorm);
    t5: ``weight * (x * rsqrt(mean(x.float()^2))).to(weight dtype)`` (T5LayerNorm).
    pow saves its fp32 base, rsqrt its result, the mul by rsqrt both; the mul by the weight saves
    the normalized tensor only when the weight trains."""
    rules = tape.rules
    tape.save(cast(tape, x, FP32), tape.new(groups, FP32, like=x))
    normed = tape.new(x.width, FP32, like=x)
    if style == "t5":
        tape.save(x)
        scaled = cast(tape, normed, rules.weight_size)
        if rules.trainable or rules.norms_train:
            tape.save(scaled)
        return tape.new(x.width, promote(rules.weight_size, scaled.size), like=x)
    if style in ("gemma", "olmo2"):
        if rules.trainable or rules.norms_train:
            tape.save(normed)
        if style == "gemma":
            tape.save_constant(x.width / groups * FP32)  # 1 + weight.float(), a new tensor per call
        return cast(tape, tape.new(x.width, promote(rules.weight_size, FP32), like=x), x.size)
    back = cast(tape, normed, x.size)
    if rules.trainable or rules.norms_train:
        tape.save(back)
    return tape.new(x.width, promote(rules.weight_size, back.size), like=x)


def layer_norm(tape: Tape, x: Tensor, *, affine: bool = True, groups: int = 1) -> Tensor:
    """``native_layer_norm`` saves its input, weight and bias, and mean and rstd, which CUDA keeps
    in fp32 for 16-bit inputs (layer_norm_kernel.cu: acc_type). Under autocast it runs in fp32:
    the input and 16-bit weight and bias are cast (the weight casts are saved, one per call)."""
    rules = tape.rules
    xin = fp32_policy(tape, x)
    tape.save(xin, tape.new(groups, FP32, like=x), tape.new(groups, FP32, like=x))
    if affine and rules.autocast and rules.weight_size < FP32:
        tape.save_constant(2 * x.width / groups * FP32)
    return tape.new(x.width, xin.size, like=x)


# -- activations -------------------------------------------------------------------------------
def activation(tape: Tape, x: Tensor, name: str) -> Tensor:
    """The tensors each activation's backward keeps (transformers/activations.py ACT2CLS)."""
    size = x.size
    if name in ("relu",):
        out = tape.new(x.width, size, like=x)
        tape.save(out)
        return out
    if name in ("gelu_new", "gelu_python_tanh"):
        # 0.5 * x * (1 + tanh(c * (x + 0.044715 * pow(x, 3)))): pow saves its (fp32-policy) base,
        # tanh its result, the last mul both of its factors.
        base = fp32_policy(tape, x)
        inner = promote(base.size, size)
        tanh, one_plus, half = tape.new(x.width, inner, like=x), tape.new(x.width, inner, like=x), tape.new(x.width, size, like=x)
        tape.save(base, tanh, one_plus, half)
        return tape.new(x.width, promote(inner, size), like=x)
    if name == "quick_gelu":
        sig = tape.new(x.width, size, like=x)
        tape.save(x, sig)
        return tape.new(x.width, size, like=x)
    if name == "gelu_fast":
        tape.save(x, *(tape.new(x.width, size, like=x) for _ in range(6)))
        return tape.new(x.width, size, like=x)
    # silu, swish, gelu, gelu_pytorch_tanh, BLOOM's GeLUFunction, and by default: the input
    tape.save(x)
    return tape.new(x.width, size, like=x)


def multiply(tape: Tape, a: Tensor, b: Tensor) -> Tensor:
    """``a * b`` with both requiring grad saves both."""
    tape.save(a, b)
    return tape.new(a.width, promote(a.size, b.size), like=a, heads_first=False, storage_width=0.0)


# -- attention -----------------------------------------------------------------------------------
def rope(tape: Tape, x: Tensor, cos_size: int, *, concatenated: bool = False) -> Tensor:
    """``x * cos + rotate_half(x) * sin``: the muls save cos and sin (shared by all layers), not
    x. The result keeps x's memory order, unless it is concatenated (partial rotary, Phi-3's
    ``torch.cat([x_embed, x_pass])``), which lays it out heads first."""
    size = promote(x.size, cos_size)
    return tape.new(x.width, size, like=x, heads_first=concatenated or x.heads_first, storage_width=0.0)


def sdpa(tape: Tape, q: Tensor, k: Tensor, v: Tensor, heads: int, *, mask: Tensor | None = None) -> Tensor:
    """``F.scaled_dot_product_attention`` on CUDA: flash for 16-bit inputs without a mask, else
    memory-efficient. Both save q, k, v as given (views keep their base), the output and an fp32
    log-sum-exp per head, the efficient kernel also the mask. SDPA's flash lays its output out like
    q (flash_api.cpp ``empty_like(q)``); the efficient kernel and the flash-attn package (which
    transformers calls with (batch, seq, heads, dim) inputs) write (batch, seq, heads, dim)."""
    q, k, v = (lowered(tape, t) for t in (q, k, v))
    if mask is not None:
        mask = lowered(tape, mask)
        tape.save(mask)
    follows_q = mask is None and q.size < FP32 and not tape.rules.flash_package
    out = tape.new(q.width, q.size, like=q, storage_width=0.0, heads_first=q.heads_first and follows_q)
    tape.save(q, k, v, out, tape.new(heads, FP32, like=q, storage_width=0.0))
    return out


def sdpa_math(tape: Tape, q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """SDPA's math fallback (query and key/value heads differ without ``enable_gqa``): it upcasts
    16-bit inputs to fp32 (attention.cpp ``_scaled_dot_product_attention_math``) and saves the
    scaled query, the key and value as the matmuls broadcast them (see ``_matmul_operand``) and the
    fp32 probabilities."""
    tape.save(tape.new(q.width, FP32, like=q))
    for t in (k, v):
        tape.save(_matmul_operand(tape, tape.new(t.width, FP32, like=t), q.width, FP32))
    tape.save(tape.new(heads, FP32, axis=Axis.key if k.axis is Axis.token else Axis.memory_key))
    return tape.new(q.width, lowered(tape, q).size, like=q, heads_first=True, storage_width=0.0)  # .to(q dtype)


def _matmul_operand(tape: Tape, t: Tensor, full_width: float, size: int) -> Tensor:
    """What ``torch.matmul`` of 4-D tensors saves for one operand: bmm takes it reshaped to
    (batch x heads, ...), a view when those dimensions merge (a heads-first tensor, or a batch of
    one, where even a slice of a fused projection or a key broadcast to every head stays a view of
    its storage), else a copy (with every head when broadcast)."""
    if t.size != size:  # autocast's 16-bit copy, in the same layout
        t = tape.new(t.width, size, like=t, storage_width=0.0)
    if (t.heads_first and not t.storage_width) or tape.rules.batch_one:
        return t
    return tape.new(full_width, size, like=t, heads_first=True, storage_width=0.0)


def eager_attention(tape: Tape, q: Tensor, k: Tensor, v: Tensor, heads: int, kv_heads: int, *, softcap: bool = False,
                    softmax_size: int | None = FP32, dropout_p: float | None = None, repeat_kv: bool = True) -> Tensor:
    """transformers' ``eager_attention_forward``: ``repeat_kv`` (a copy; with one key/value head an
    expanded view, as are keys and values that matmul broadcasts); ``matmul(q, k^T)`` on operands reshaped to (batch x heads, ...)
    (``_matmul_operand``); Gemma-2's soft-capping (tanh saves its result); softmax, which saves its
    result (fp32 under autocast or with ``dtype=torch.float32``, ``softmax_size``; else the scores'
    dtype); the 16-bit probabilities, or their dropout output and mask, for ``matmul(probs, v)``."""
    cb = tape.rules.compute_size
    axis = Axis.key if k.axis is Axis.token else Axis.memory_key
    tape.save(_matmul_operand(tape, q, q.width, cb))
    for t in (k, v):
        if repeat_kv and 1 < kv_heads < heads:  # repeat_kv: expand + reshape, a heads-first copy
            t = tape.new(q.width, t.size, like=t, heads_first=True, storage_width=0.0)
        tape.save(_matmul_operand(tape, t, q.width, cb))
    if softcap:
        tape.save(tape.new(heads, cb, axis=axis))
    size = FP32 if tape.rules.autocast else (softmax_size or cb)
    soft = tape.new(heads, size, axis=axis)
    tape.save(soft)
    probs = soft if size == cb else tape.new(heads, cb, axis=axis)
    probs = dropout(tape, probs, tape.rules.attention_dropout if dropout_p is None else dropout_p)
    tape.save(probs)
    return tape.new(q.width, cb, like=q, heads_first=True, storage_width=0.0)


def heads_last(tape: Tape, out: Tensor) -> Tensor:
    """``out.transpose(1, 2).contiguous()`` (or view/permute/reshape): free when the kernel wrote
    (batch, seq, heads, dim), a copy when it wrote heads first."""
    if out.heads_first:
        return tape.new(out.width, out.size, like=out, heads_first=False, storage_width=0.0)
    return out
