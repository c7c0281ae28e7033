"""Accuracy against published measurements: vramplan's estimate of each mapped workload beside the
figure its source measured, and two calculator-style baselines for context.

Run: python bench/bench_accuracy.py   (prints a markdown table; writes bench/results/accuracy.json)

Inputs: bench/published_measurements.json (what was measured, by whom, how) and
bench/published_workloads.json (each measurement mapped to a Workload, the estimate figure it is
compared with, and a divisor for figures that sum several GPUs). The figure compared follows the
measurement's kind: allocated -> allocated_peak_bytes (torch.cuda.max_memory_allocated),
reserved -> reserved_peak_bytes (max_memory_reserved), nvidia-smi -> peak_bytes, allocated+context ->
allocated_peak_bytes + the CUDA context term (optimum's benchmark: peak allocated plus memory used outside PyTorch).

Baselines, from the same Estimate: "weights only" (the weights and quantization constants every
calculator starts from) and "model states" (weights + gradients + optimizer states,
model_state_bytes: the ZeRO-paper 16 bytes/parameter arithmetic made exact). Neither adds
activations, logits, KV cache, allocator reserve or CUDA context.

Error is (estimated - measured) / measured: positive means vramplan over-estimates. GiB = 2**30 bytes.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from app.catalog import Catalog, load_catalog
from app.estimator.estimate import Estimate, estimate
from app.units import GIB
from app.workload import Workload

BENCH_DIR = Path(__file__).resolve().parent
MEASUREMENTS_PATH = BENCH_DIR / "published_measurements.json"
WORKLOADS_PATH = BENCH_DIR / "published_workloads.json"
RESULTS_PATH = BENCH_DIR / "results" / "accuracy.json"

COMPARED_FIGURE = {"allocated": "allocated_peak_bytes", "reserved": "reserved_peak_bytes", "nvidia-smi": "peak_bytes",
                   "allocated+context": "allocated_peak_bytes"}  # + the CUDA context term (compared_figure)


def compared_figure(result: Estimate, kind: str) -> int:
    """The estimate's figure of a measurement's kind. "allocated+context": torch's peak allocated plus
    the device memory used outside PyTorch (the CUDA context), as optimum's benchmark reports it."""
    figure = getattr(result, COMPARED_FIGURE[kind])
    return figure + result.terms.get("cuda_context", 0) if kind == "allocated+context" else figure
METHOD_ORDER = ["inference", "full", "lora", "qlora"]


def load_cases() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(mapped cases, skipped measurements): each case joins a mapping record to its measurement."""
    measurements = {m["id"]: m for m in json.loads(MEASUREMENTS_PATH.read_text())}
    mapping = json.loads(WORKLOADS_PATH.read_text())
    cases = [{**record, "measurement": measurements[record["id"]]} for record in mapping["workloads"]]
    return cases, mapping["skipped"]


def fitted_ids() -> set[str]:
    """Measurements a coefficient the estimator uses was fitted on (profiles/calibration/
    allocator.json): in-sample rows. The default reserve is fitted on allocator replays of
    simulated steps, so only the runs behind the empty-cache fraction remain in-sample."""
    path = Path(__file__).resolve().parent.parent / "profiles" / "calibration" / "allocator.json"
    if not path.exists():
        return set()
    data = json.loads(path.read_text())
    emptied = {sample["run"] for sample in data.get("samples_with_empty_cache", [])}
    if "replay" in data:  # the estimator's reserve comes from the replay fit, not from these runs
        return emptied
    runs = {sample["run"] for sample in data.get("samples", [])}
    return {run + "-smi" for run in runs} | emptied


def baselines(result: Estimate) -> dict[str, int]:
    """Calculator-style figures from the same estimate: weights only, and weights + grads + optimizer states."""
    weights = result.terms.get("weights", 0) + result.terms.get("quantization_constants", 0)
    return {"weights_only": weights, "model_states": result.model_state_bytes}


def evaluate(case: dict[str, Any], catalog: Catalog, fitted: frozenset[str] = frozenset()) -> dict[str, Any]:
    """One row: the measured figure per GPU, the estimate of the same kind, the baselines and the errors."""
    measurement = case["measurement"]
    workload = Workload.model_validate(case["workload"])
    result = estimate(workload, catalog)
    measured = measurement["measured_bytes"] / case.get("per_gpu_divisor", 1)
    estimated = compared_figure(result, case["compare"])
    figures = {"vramplan": estimated, **baselines(result)}
    return {
        "id": case["id"],
        "model": measurement["model"],
        "method": result.method,
        "gpu": result.gpu,
        "num_gpus": result.num_gpus,
        "kind": case["compare"],
        "measured_bytes": round(measured),
        "estimated_bytes": estimated,
        "weights_only_bytes": figures["weights_only"],
        "model_states_bytes": figures["model_states"],
        "error": {name: (value - measured) / measured for name, value in figures.items()},
        "peak_phase": result.peak_phase,
        "terms": result.terms,
        "source": measurement["source"],
        "fitted": case["id"] in fitted,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Median and worst absolute error per method and overall, for vramplan and each baseline; and
    overall without the rows a coefficient was fitted on (out of sample)."""
    groups = {method: [r for r in rows if r["method"] == method] for method in _methods(rows)}
    groups["overall"] = rows
    if any(r["fitted"] for r in rows):
        groups["out of sample"] = [r for r in rows if not r["fitted"]]
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for group, members in groups.items():
        summary[group] = {"n": len(members)}
        for figure in ("vramplan", "weights_only", "model_states"):
            errors = [abs(r["error"][figure]) for r in members]
            summary[group][figure] = {"median_abs_error": statistics.median(errors), "max_abs_error": max(errors)}
    return summary


def _methods(rows: list[dict[str, Any]]) -> list[str]:
    present = {r["method"] for r in rows}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def _sort_key(row: dict[str, Any]) -> tuple[int, str, str, int]:
    """By method, then model, then kind, then size (so a model's context-length sweep reads in order)."""
    rank = METHOD_ORDER.index(row["method"]) if row["method"] in METHOD_ORDER else len(METHOD_ORDER)
    return rank, row["model"], row["kind"], row["measured_bytes"]


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any], skipped: int) -> str:
    lines = [
        f"{len(rows)} published measurements mapped, {skipped} skipped (reasons in bench/published_workloads.json). "
        "Error = (estimated - measured) / measured; GiB = 2^30 bytes. 'fit': the allocator-reserve coefficient was "
        "fitted on this row (profiles/calibration/allocator.json).",
        "",
        "| id | model | method | GPU | kind | measured (GiB) | estimated (GiB) | error | fit |",
        "|---|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        gpu = r["gpu"] if r["num_gpus"] == 1 else f"{r['num_gpus']} x {r['gpu']}"
        lines.append(
            f"| {r['id']} | {r['model']} | {r['method']} | {gpu} | {r['kind']} | {r['measured_bytes'] / GIB:.2f} "
            f"| {r['estimated_bytes'] / GIB:.2f} | {r['error']['vramplan']:+.1%} | {'yes' if r['fitted'] else ''} |"
        )
    lines += [
        "",
        "Absolute error, median / worst, of vramplan and of two calculator-style baselines computed from the same "
        "estimate (weights only; weights + gradients + optimizer states):",
        "",
        "| method | n | vramplan | weights only | weights + grads + optimizer |",
        "|---|---:|---:|---:|---:|",
    ]
    for group, stats in summary.items():
        cells = [f"{stats[f]['median_abs_error']:.1%} / {stats[f]['max_abs_error']:.1%}"
                 for f in ("vramplan", "weights_only", "model_states")]
        lines.append(f"| {group} | {stats['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    catalog = load_catalog()
    cases, skipped = load_cases()
    fitted = frozenset(fitted_ids())
    rows = sorted((evaluate(case, catalog, fitted) for case in cases), key=_sort_key)
    summary = summarize(rows)
    print(markdown(rows, summary, len(skipped)))
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "about": "vramplan estimates vs published measurements; error = (estimated - measured) / measured; bytes per GPU",
        "summary": summary,
        "rows": rows,
        "skipped": skipped,
    }
    RESULTS_PATH.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
