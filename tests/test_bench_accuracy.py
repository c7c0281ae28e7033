"""The accuracy benchmark's inputs stay runnable: every published measurement is either mapped to a Workload
that validates and estimates, or skipped with a reason. No accuracy threshold here: the numbers live in
bench/results/accuracy.json and the README, and move as the estimator improves."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from app.workload import Workload

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
MEASUREMENTS = {m["id"]: m for m in json.loads((BENCH_DIR / "published_measurements.json").read_text())}
MAPPING = json.loads((BENCH_DIR / "published_workloads.json").read_text())
RECORDS = MAPPING["workloads"]
SKIPPED = MAPPING["skipped"]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", BENCH_DIR / "bench_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_accuracy = _load_bench()


def test_every_measurement_is_mapped_or_skipped_exactly_once():
    mapped = [r["id"] for r in RECORDS]
    skipped = [s["id"] for s in SKIPPED]
    assert len(mapped) == len(set(mapped)) and len(skipped) == len(set(skipped))
    assert not set(mapped) & set(skipped)
    assert set(mapped) | set(skipped) == set(MEASUREMENTS)


def test_every_skip_gives_a_reason():
    assert all(s["reason"].strip() for s in SKIPPED)


@pytest.mark.parametrize("record", RECORDS, ids=[r["id"] for r in RECORDS])
def test_mapped_workload_validates_and_estimates(record, catalog):
    measurement = MEASUREMENTS[record["id"]]
    assert record["compare"] in bench_accuracy.COMPARED_FIGURE
    # A published figure of kind allocated/reserved/nvidia-smi is compared with the same kind only.
    assert measurement["kind"] in (record["compare"], "unknown")
    assert record.get("per_gpu_divisor", 1) >= 1
    assert record["mapping_notes"].strip()
    Workload.model_validate(record["workload"])
    row = bench_accuracy.evaluate({**record, "measurement": measurement}, catalog)
    assert row["estimated_bytes"] > 0
    assert row["measured_bytes"] > 0


def test_summary_has_a_row_per_method_and_overall(catalog):
    rows = [bench_accuracy.evaluate({**r, "measurement": MEASUREMENTS[r["id"]]}, catalog) for r in RECORDS]
    summary = bench_accuracy.summarize(rows)
    assert set(summary) == {r["method"] for r in rows} | {"overall"}
    assert summary["overall"]["n"] == len(RECORDS)


def test_the_published_fit_keeps_what_other_fits_wrote_in_allocator_json(tmp_path):
    from app.calibration.fit_published import fit_allocator

    path = tmp_path / "allocator.json"
    path.write_text(json.dumps({"replay": {"fragmentation_fraction": 0.5, "cases": 3}}))
    result = fit_allocator(out=path)
    saved = json.loads(path.read_text())
    assert saved["replay"] == {"fragmentation_fraction": 0.5, "cases": 3}
    assert saved["fragmentation_fraction"] == result["fragmentation_fraction"] > 0
    assert saved["samples"] and saved["samples_with_empty_cache"]


def test_the_published_fit_measures_transient_bytes_with_every_reserve_fraction_at_one(catalog):
    """The probe must not fall back to the empty-cache or replay fractions: a run's transient bytes do
    not depend on whether it empties the cache."""
    from app.calibration.fit_published import _transient_bytes

    emptied = [Workload.model_validate(r["workload"]) for r in RECORDS if r["workload"].get("training", {}).get("torch_empty_cache_steps")]
    assert emptied
    for workload in emptied:
        kept = workload.model_copy(update={"training": workload.training.model_copy(update={"torch_empty_cache_steps": None})})
        assert _transient_bytes(workload, catalog) == _transient_bytes(kept, catalog)
