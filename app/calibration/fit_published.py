"""Fit the caching allocator's reserve to published runs that report both figures of one run.

For each run published with both ``torch.cuda.max_memory_allocated`` and the nvidia-smi peak, the
gap between them, less the CUDA context the estimator already names, is memory the allocator held
but no tensor used. Divided by the estimator's transient (non-state) bytes of that run it gives one
sample of the fragmentation fraction; the median over runs is stored, with every sample, in
``profiles/calibration/allocator.json``. Pure Python: no torch needed. (Issue 8's replay of real
allocation traces replaces this fraction by a computed reserve.)
"""

from __future__ import annotations

import json
import statistics
from datetime import date
from pathlib import Path
from typing import Any

from app.catalog import Catalog, load_catalog
from app.estimator.estimate import estimate
from app.workload import Workload

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
PAIR_SUFFIXES = ("-smi", "-peakalloc")


def _transient_bytes(workload: Workload, catalog: Catalog) -> tuple[int, int]:
    """(transient bytes at the peak, context bytes) of the estimate: with a reserve fraction of 1
    the reserve equals the transient bytes (above the one-segment minimum)."""
    # every reserve fraction 1 (the replay's by method, the empty-cache one): none may fall back to another value
    probe_allocator = {"fragmentation_fraction": 1.0, "fragmentation_fraction_with_empty_cache": 1.0}
    probe = catalog.model_copy(update={"calibration": {**catalog.calibration, "allocator": probe_allocator}})
    result = estimate(workload, probe)
    return result.reserved_peak_bytes - result.allocated_peak_bytes, result.terms["cuda_context"]


def fragmentation_samples(measurements: list[dict[str, Any]], workloads: dict[str, dict[str, Any]], catalog: Catalog) -> list[dict[str, Any]]:
    """One sample per run published with both an nvidia-smi and an allocated peak."""
    by_id = {m["id"]: m for m in measurements}
    samples = []
    for smi_id, smi in by_id.items():
        if not smi_id.endswith("-smi"):
            continue
        alloc = by_id.get(smi_id.removesuffix("-smi") + "-peakalloc")
        mapped = workloads.get(smi_id)
        if alloc is None or mapped is None:
            continue
        divisor = mapped.get("per_gpu_divisor", 1)
        workload = Workload.model_validate(mapped["workload"])
        transient, context = _transient_bytes(workload, catalog)
        gap = (smi["measured_bytes"] - alloc["measured_bytes"]) / divisor - context
        samples.append({"run": smi_id.removesuffix("-smi"), "gap_bytes": int(gap), "transient_bytes": transient,
                        "fraction": round(gap / transient, 4), "source": smi["source"]})
    return samples


def empty_cache_samples(measurements: list[dict[str, Any]], workloads: dict[str, dict[str, Any]], catalog: Catalog) -> list[dict[str, Any]]:
    """One sample per reserved-memory run that empties the cache periodically (reserved minus the
    estimated allocated peak, over the transient bytes)."""
    samples = []
    for measurement in measurements:
        mapped = workloads.get(measurement["id"])
        if measurement["kind"] != "reserved" or mapped is None:
            continue
        workload = Workload.model_validate(mapped["workload"])
        if not workload.training.torch_empty_cache_steps:
            continue
        transient, _ = _transient_bytes(workload, catalog)
        allocated = estimate(workload, catalog).allocated_peak_bytes
        gap = measurement["measured_bytes"] / mapped.get("per_gpu_divisor", 1) - allocated
        samples.append({"run": measurement["id"], "gap_bytes": int(gap), "transient_bytes": transient,
                        "fraction": round(max(gap, 0) / transient, 4), "source": measurement["source"]})
    return samples


def fit_allocator(out: Path | None = None) -> dict[str, Any]:
    """Fit the fractions over the published runs and write them with their provenance into
    allocator.json, keeping what other fits wrote there (the suite's "replay" section)."""
    measurements = json.loads((BENCH_DIR / "published_measurements.json").read_text())
    mapped = json.loads((BENCH_DIR / "published_workloads.json").read_text())["workloads"]
    workloads = {entry["id"]: entry for entry in mapped}
    catalog = load_catalog()
    samples = fragmentation_samples(measurements, workloads, catalog)
    emptied = empty_cache_samples(measurements, workloads, catalog)
    result = {
        "fragmentation_fraction": round(statistics.median(s["fraction"] for s in samples), 4),
        "fragmentation_fraction_with_empty_cache": round(statistics.median(s["fraction"] for s in emptied), 4),
        "method": "median over runs of (nvidia-smi - max_memory_allocated - CUDA context) / estimated transient bytes; "
                  "with torch_empty_cache_steps: median of (max_memory_reserved - estimated allocated) / transient",
        "command": "vramplan calibrate --published",
        "date": date.today().isoformat(),
        "samples": samples,
        "samples_with_empty_cache": emptied,
    }
    path = out or Path(__file__).resolve().parents[2] / "profiles" / "calibration" / "allocator.json"
    kept = json.loads(path.read_text()) if path.exists() else {}
    merged = {**kept, **result}
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return merged
