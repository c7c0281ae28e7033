"""Estimate latency, in-process: median and p99 per call over the catalog's models and methods.

Run: python bench/bench_estimate.py   (prints a markdown table; target: under 1 ms per estimate)

"warm" is the steady state of a server or the planner (the resolved config and the block traces are
memoized, app/estimator/model.py and activations.py); "cold" clears those caches before every call.
"""

from __future__ import annotations

import platform
import statistics
import time

from app.catalog import load_catalog
from app.estimator.estimate import clear_memo_caches, estimate
from app.workload import Workload

CASES = {
    "Llama-2-7B QLoRA, T4": {"model": {"id": "meta-llama/Llama-2-7b-hf"}, "lora": {"r": 64, "target_modules": "all-linear"},
                             "quantization": {"load_in_4bit": True, "bnb_4bit_use_double_quant": True},
                             "training": {"per_device_train_batch_size": 1, "max_seq_length": 512, "fp16": True}, "hardware": {"gpu": "T4"}},
    "Llama-3.1-405B full, 64 x H100, ZeRO-3": {"model": {"id": "meta-llama/Llama-3.1-405B", "dtype": "bfloat16"},
                                               "hardware": {"gpu": "H100", "num_gpus": 64}, "distributed": {"strategy": "zero3"}},
    "Mixtral-8x7B LoRA, A100-80GB": {"model": {"id": "mistralai/Mixtral-8x7B-v0.1"}, "lora": {"r": 16}, "hardware": {"gpu": "A100-80GB"}},
    "flan-t5-xxl inference, L4": {"model": {"id": "google/flan-t5-xxl"}, "task": "inference", "hardware": {"gpu": "L4"}},
}
REPEATS = 2000


def time_case(workload: Workload, cold: bool) -> tuple[float, float]:
    catalog = load_catalog()
    samples = []
    for _ in range(REPEATS // 10 if cold else REPEATS):
        if cold:
            clear_memo_caches()
        start = time.perf_counter()
        estimate(workload, catalog)
        samples.append(time.perf_counter() - start)
    samples.sort()
    return statistics.median(samples) * 1e3, samples[int(len(samples) * 0.99)] * 1e3


def main() -> None:
    print(f"Python {platform.python_version()} on {platform.machine()}, {REPEATS} calls per case, one core\n")
    print("| case | warm median (ms) | warm p99 (ms) | cold median (ms) | cold p99 (ms) |")
    print("|---|---:|---:|---:|---:|")
    for name, data in CASES.items():
        workload = Workload.model_validate(data)
        (median, p99), (cold_median, cold_p99) = time_case(workload, cold=False), time_case(workload, cold=True)
        print(f"| {name} | {median:.3f} | {p99:.3f} | {cold_median:.3f} | {cold_p99:.3f} |")


if __name__ == "__main__":
    main()
