"""Narrow, reversible patches that let library code run on fake tensors as it runs on real ones.

Each is a context manager that restores what it changed. None of them changes what a real run
allocates; they remove differences that exist only because the tensors are fake.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any


@contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``owner.name = value`` for the duration."""
    missing = object()
    old = getattr(owner, name, missing)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, old)


@contextmanager
def causal_sdpa_for_fake_tensors() -> Iterator[None]:
    """Let transformers skip the explicit attention mask for fake inputs, as it does for real ones.

    ``_ignore_causal_mask_sdpa`` and ``_ignore_bidirectional_mask_sdpa`` (transformers/
    masking_utils.py:252-361) and ``find_packed_sequence_indices`` (masking_utils.py:735-764) treat
    a FakeTensor as tracing (``is_tracing``, utils/import_utils.py:1959) and then build a 4-D mask,
    which sends SDPA to a kernel that a run with an all-ones mask never uses. The simulated batches
    have no padding and no packing: for a fake all-ones mask these functions now decide as they
    do for no mask at all, which is what they decide for a real all-ones mask.
    """
    import transformers.masking_utils as masking
    from torch._subclasses.fake_tensor import is_fake

    ignore_causal, ignore_bidirectional = masking._ignore_causal_mask_sdpa, masking._ignore_bidirectional_mask_sdpa
    find_packed = masking.find_packed_sequence_indices

    def _unpadded(mask: Any) -> Any:
        return None if mask is not None and is_fake(mask) else mask

    def ignore_causal_mask_sdpa(padding_mask: Any, *args: Any, **kwargs: Any) -> bool:
        return ignore_causal(_unpadded(padding_mask), *args, **kwargs)

    def ignore_bidirectional_mask_sdpa(padding_mask: Any, *args: Any, **kwargs: Any) -> bool:
        return ignore_bidirectional(_unpadded(padding_mask), *args, **kwargs)

    def find_packed_sequence_indices(position_ids: Any) -> Any:
        return None if is_fake(position_ids) else find_packed(position_ids)

    with ExitStack() as stack:
        stack.enter_context(patched(masking, "_ignore_causal_mask_sdpa", ignore_causal_mask_sdpa))
        stack.enter_context(patched(masking, "_ignore_bidirectional_mask_sdpa", ignore_bidirectional_mask_sdpa))
        stack.enter_context(patched(masking, "find_packed_sequence_indices", find_packed_sequence_indices))
        yield


@contextmanager
def bnb_code_maps() -> Iterator[None]:
    """Build bitsandbytes' code maps outside fake mode and keep the global cache clean.

    ``create_dynamic_map`` reads tensor values (bitsandbytes/functional.py:327), which a fake tensor
    cannot do; its result is cached in the module-global ``name2qmap`` (functional.py:654-656).
    Inside this context the map is computed for real, then converted to a fake tensor when a fake
    mode is active; ``name2qmap`` is restored on exit so no fake tensor outlives its mode.
    """
    import bitsandbytes.functional as bnb_functional
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    original = bnb_functional.create_dynamic_map
    saved = dict(bnb_functional.name2qmap)
    bnb_functional.name2qmap.clear()

    def create_dynamic_map(*args: Any, **kwargs: Any) -> Any:
        fake_mode = detect_fake_mode()
        with unset_fake_temporarily():
            code = original(*args, **kwargs)
        return fake_mode.from_tensor(code) if fake_mode is not None else code

    try:
        with patched(bnb_functional, "create_dynamic_map", create_dynamic_map):
            yield
    finally:
        bnb_functional.name2qmap.clear()
        bnb_functional.name2qmap.update(saved)


@contextmanager
def peft_dequantizes_fake_4bit() -> Iterator[None]:
    """PEFT's ``dequantize_module_weight`` (peft/utils/integrations.py, used by DoRA) for the
    simulation's 4-bit weights.

    A simulated Linear4bit keeps a plain Parameter with Params4bit's attributes (build.py: Params4bit
    cannot wrap a FakeTensor), which PEFT takes for an unquantized weight and returns packed. On a
    GPU ``dequantize_4bit`` allocates the weight in ``quant_state``'s shape and dtype
    (bitsandbytes/functional.py): that tensor is made here; its values never matter.
    """
    import torch
    from peft.tuners.lora import dora
    from peft.utils import integrations

    original = integrations.dequantize_module_weight

    def dequantize_module_weight(module: Any) -> Any:
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(weight, "bnb_quantized", False) and type(weight).__name__ != "Params4bit":
            return torch.empty(tuple(state.shape), dtype=state.dtype, device=weight.device)
        return original(module)

    with ExitStack() as stack:
        stack.enter_context(patched(integrations, "dequantize_module_weight", dequantize_module_weight))
        stack.enter_context(patched(dora, "dequantize_module_weight", dequantize_module_weight))
        yield


def disable_cpu_4bit_packing(model: Any) -> None:
    """Keep ``Linear4bit`` in the layout a GPU uses.

    In eval mode without gradients, bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs on the
    first forward (bitsandbytes/nn/modules.py:613-620). A GPU never does.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
