"""The context a simulated (or real CPU) step runs in: fake mode, patches, CUDA emulation, tracker."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Literal

from app.calibration.gpu import GpuArch
from app.calibration.tracker import StorageTracker

if TYPE_CHECKING:
    from torch import nn

Mode = Literal["fake", "cpu"]


@contextmanager
def simulation_environment(mode: Mode, emulate_cuda: bool, arch: GpuArch, mixed_precision: bool) -> Iterator[StorageTracker]:
    """Everything the build and the step need, undone on exit. Yields the (not yet active) tracker.

    ``fake``: every tensor is a FakeTensor on the CPU device and owns no memory. ``cpu``: real
    tensors (the proof run). ``emulate_cuda`` (fake only) swaps in what a CUDA GPU of ``arch``
    runs: its autocast policy, SDPA kernels and bitsandbytes kernels.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from app.calibration import cuda_autocast, cuda_kernels, patches
    from app.calibration.optimizers import clean_bnb_manager

    if emulate_cuda and mode != "fake":
        raise ValueError("CUDA kernels can only be emulated on fake tensors")
    tracker = StorageTracker()
    with ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.enter_context(_quiet_transformers())
        stack.enter_context(patches.bnb_code_maps())
        stack.enter_context(clean_bnb_manager())
        if mode == "fake":
            stack.enter_context(FakeTensorMode())
            stack.enter_context(patches.causal_sdpa_for_fake_tensors())
            stack.enter_context(patches.peft_dequantizes_fake_4bit())
        else:
            torch.manual_seed(0)
        if emulate_cuda:
            tracker.op_hooks.update(cuda_kernels.cuda_op_hooks(arch))
            stack.enter_context(cuda_kernels.cuda_functions(arch))
            if mixed_precision:
                stack.enter_context(cuda_autocast.cuda_autocast_policy())
        yield tracker


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the libraries' per-call warnings (bitsandbytes logs one per 8-bit matmul)."""
    import logging as std_logging

    from transformers.utils import logging

    level = logging.get_verbosity()
    bnb_logger = std_logging.getLogger("bitsandbytes")
    bnb_level = bnb_logger.level
    logging.set_verbosity_error()
    bnb_logger.setLevel(std_logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(level)
        bnb_logger.setLevel(bnb_level)


def register_model_state(tracker: StorageTracker, model: nn.Module) -> None:
    """Count what exists before the step: quantization state, parameters, buffers, code maps."""
    import bitsandbytes.functional as bnb_functional

    for module in model.modules():
        for tensor in _quantization_tensors(module):
            tracker.track(tensor, "quantization_state")
    for parameter in model.parameters():
        tracker.track(parameter, "parameters")
    for buffer in model.buffers():
        tracker.track(buffer, "parameters")
    for code in bnb_functional.name2qmap.values():
        tracker.track(code, "quantization_state")


def _quantization_tensors(module: Any) -> list[Any]:
    """The tensors of a bitsandbytes layer's quantization state (absmax, code maps, scales)."""
    import torch

    found: list[Any] = []
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
    while state is not None:
        found += [getattr(state, name, None) for name in ("absmax", "code", "offset")]
        state = getattr(state, "state2", None)
    lt_state = getattr(module, "state", None)
    found += [getattr(weight, "SCB", None), getattr(lt_state, "SCB", None)]
    return [tensor for tensor in found if isinstance(tensor, torch.Tensor)]
