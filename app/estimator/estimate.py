"""estimate(workload, catalog) -> Estimate: the peak memory of one training step (or one
generation), per GPU, term by term, with the phase at which the peak falls."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from app.catalog import Catalog, GPUProfile
from app.estimator.activations import traced_block_cache_clear
from app.estimator.model import ResolvedModel, resolve_config_cache_clear, resolve_model
from app.estimator.overhead import NCCL_BUFFER_BYTES, coefficients_for, reserved_from_allocated
from app.estimator.phases import PhasePeaks, phase_peaks
from app.estimator.setup import resolve_setup
from app.estimator.sharding import per_gpu_states
from app.estimator.sources import SOURCES
from app.estimator.versions import CALIBRATED_WITH
from app.estimator.warnings import collect_warnings
from app.units import format_gib
from app.workload import Workload


class Estimate(BaseModel):
    """The answer: bytes at three levels, every term by name, the verdict and why."""

    model_config = ConfigDict(frozen=True)

    model: str
    gpu: str
    gpu_name: str
    num_gpus: int
    method: str
    precision: str
    peak_bytes: int
    allocated_peak_bytes: int
    reserved_peak_bytes: int
    usable_bytes: int
    headroom_bytes: int
    fits: bool
    verdict: str  # fits | fits_with_paging | does_not_fit
    num_parameters: int
    trainable_parameters: int
    model_state_bytes: int
    paged_bytes: int
    terms: dict[str, int]
    peak_phase: str
    phase_peaks: dict[str, int]
    warnings: list[str]
    sources: dict[str, str]
    calibrated_with: dict[str, str]


def clear_memo_caches() -> None:
    """Forget the memoized configs and block traces (benchmarks time the cold path with this)."""
    resolve_config_cache_clear()
    traced_block_cache_clear()


def estimate(workload: Workload, catalog: Catalog) -> Estimate:
    """Estimate the per-GPU peak memory of ``workload``.

    Raises UnknownModelError / UnknownGPUError / ArchitectureError / SetupError (all ValueError or
    LookupError subclasses) with a message naming the field at fault.
    """
    gpu = catalog.gpu(workload.hardware.gpu)
    model = resolve_model(workload.model, catalog, workload.software)
    setup = resolve_setup(workload, model.arch, model.modules, gpu)
    states = per_gpu_states(model, setup, workload)
    peaks = phase_peaks(model, setup, workload, states)
    return _assemble(workload, catalog, gpu, model, setup.precision.value, states, peaks)


def _assemble(workload: Workload, catalog: Catalog, gpu: GPUProfile, model: ResolvedModel, precision: str, states, peaks: PhasePeaks) -> Estimate:
    coefficients = coefficients_for(gpu, catalog.calibration, workload.software,
                                    empties_cache=workload.training.torch_empty_cache_steps is not None,
                                    training=workload.task.value == "train", method=workload.method)
    # Paged optimizer states live in CUDA managed memory (bitsandbytes/optim/optimizer.py,
    # get_paged): outside the caching allocator, so outside max_memory_allocated/reserved, but
    # resident on the device (and counted by nvidia-smi) until the driver pages them out.
    paged = states.paged_bytes
    allocated = peaks.peak_bytes - paged + coefficients.cublas_workspace_bytes
    reserved = reserved_from_allocated(allocated, peaks.transient_bytes, coefficients)
    nccl = NCCL_BUFFER_BYTES if workload.hardware.num_gpus > 1 and workload.task.value == "train" else 0
    peak = reserved + coefficients.context_bytes + paged + nccl
    usable = gpu.memory_bytes
    fits = peak <= usable
    verdict = "fits" if fits else ("fits_with_paging" if paged and peak - paged <= usable else "does_not_fit")
    terms = dict(peaks.terms)
    terms["cublas_workspace"] = coefficients.cublas_workspace_bytes
    terms["allocator_reserve"] = reserved - allocated
    terms["cuda_context"] = coefficients.context_bytes
    if nccl:
        terms["nccl_buffers"] = nccl
    sources = {name: SOURCES.get(name, "") for name in terms}
    sources["cuda_context"] = coefficients.source
    warnings = collect_warnings(workload, gpu, model, catalog, peak, usable, verdict)
    return Estimate(
        model=model.name,
        gpu=gpu.id,
        gpu_name=gpu.name,
        num_gpus=workload.hardware.num_gpus,
        method=workload.method,
        precision=precision,
        peak_bytes=peak,
        allocated_peak_bytes=allocated,
        reserved_peak_bytes=reserved,
        usable_bytes=usable,
        headroom_bytes=usable - peak,
        fits=fits,
        verdict=verdict,
        num_parameters=states.counts.total,
        trainable_parameters=states.counts.trainable,
        model_state_bytes=states.model_state_bytes,
        paged_bytes=paged,
        terms=terms,
        peak_phase=peaks.peak_phase,
        phase_peaks=peaks.by_phase,
        warnings=warnings,
        sources=sources,
        calibrated_with=dict(CALIBRATED_WITH),
    )


def describe(estimate_: Estimate) -> str:
    """One line: ``Fits on NVIDIA T4 16 GB with 2.1 GiB to spare`` or why not."""
    if estimate_.fits:
        return f"Fits on {estimate_.gpu_name} with {format_gib(estimate_.headroom_bytes)} to spare"
    need = format_gib(estimate_.peak_bytes)
    have = format_gib(estimate_.usable_bytes)
    if estimate_.verdict == "fits_with_paging":
        return f"Fits only with paging: needs {need}, the {estimate_.gpu_name} has {have}; paged optimizer states spill to CPU memory"
    return f"Does not fit: needs {need}, the {estimate_.gpu_name} has {have} usable"
