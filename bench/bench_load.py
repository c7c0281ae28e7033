"""Load test on loopback: POST /api/v1/estimate at a fixed arrival rate, with the server's memory watched.

    python bench/bench_load.py [--rates 1000 800 500] [--seconds 60] [--bodies 2000] [--connections 64] [--out bench/results/load.json]

Starts ``uvicorn app.main:create_app --factory --workers 1`` on a free 127.0.0.1 port (nothing else is
ever a target) and, for each rate, runs an open-loop client for ``--seconds``: request i is due at
``start + i / rate`` whatever happened to the earlier ones, so a server that falls behind shows it as
latency (measured from the due time, which avoids coordinated omission) rather than as a politely
slower client. Requests go over ``--connections`` keep-alive HTTP/1.1 connections (raw asyncio
sockets: the client costs little CPU, but it shares the machine's cores with the server). Bounded:
each phase stops sending at its end and waits at most ``DRAIN_S`` for the requests in flight, which
count as errors if unanswered.

The bodies cycle through ``--bodies`` distinct workloads (``mixed_workloads``: every catalog model,
full / LoRA / QLoRA / inference, five GPUs, several batch sizes and lengths), each checked in-process
first, so every request should get a 200; ``--bodies 1`` repeats the OpenAPI example. A warm-up sends
every body once before the measured phases (the memo caches fill once, then stay bounded).

Reported per phase: requests sent and answered, errors (non-200 or no answer), achieved rate, p50,
p90, p99 and max latency, the server's CPU use, and its resident memory (VmRSS from
/proc/<pid>/status) at the start, the middle and the end, sampled every second. 1000 requests/s is
twice the 500/s target of the web/API issue (bench/bench_api.py). Writes bench/results/load.json and
prints a markdown table. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.catalog import load_catalog  # noqa: E402
from app.estimator.estimate import estimate  # noqa: E402
from app.schemas import QLORA_T4  # noqa: E402
from app.settings import get_settings  # noqa: E402
from app.workload import Workload  # noqa: E402
from bench.bench_api import free_port, machine, read_response, request_bytes, start_server, wait_until_up  # noqa: E402

DRAIN_S = 5.0
WARMUP_RPS = 400.0
TARGET_RPS = 1000.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Phase:
    target_rps: float
    seconds: float
    connections: int
    sent: int = 0
    answered: int = 0
    errors: int = 0  # non-200 answers plus requests left unanswered
    http_errors: int = 0
    unanswered: int = 0  # still queued or in flight DRAIN_S after the phase ended (a backlog), or lost
    achieved_rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    server_cpu_percent: float = 0.0
    rss_mib: dict[str, float] = field(default_factory=dict)
    rss_samples_mib: list[float] = field(default_factory=list)


def rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` in MiB (Linux /proc; psutil would read the same field)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (proc(5), /proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def mixed_workloads(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` distinct workloads the estimator accepts, drawn over the whole catalog: every model,
    full fine-tuning / LoRA / QLoRA / inference, five GPUs, micro-batches 1-8, 256-4096 tokens. A load
    of one repeated body would only measure the memoized paths (the block trace, the config)."""
    catalog = load_catalog(get_settings().profiles_dir)
    models, rng, seen = sorted(catalog.models), random.Random(seed), set()
    chosen: list[dict[str, Any]] = []
    for _ in range(50 * count):
        if len(chosen) == count:
            break
        key = (rng.choice(models), rng.choice(METHODS), rng.choice(GPUS), rng.choice((1, 2, 4, 8)), rng.choice((256, 512, 1024, 2048, 4096)))
        if key in seen:
            continue
        seen.add(key)
        workload = _workload(*key)
        try:
            estimate(Workload.model_validate(workload), catalog)
        except (ValueError, LookupError):  # e.g. LoRA on a model the estimator cannot adapt: not a load-test body
            continue
        chosen.append(workload)
    return chosen


METHODS = ("full", "lora", "qlora", "inference")
GPUS = ("T4", "A10G", "4090", "A100-80GB", "H100-80GB")


def _workload(model: str, method: str, gpu: str, batch: int, tokens: int) -> dict[str, Any]:
    hardware = {"gpu": gpu}
    if method == "inference":
        return {"model": {"id": model, "dtype": "float16"}, "task": "inference", "inference": {"batch_size": batch, "prompt_tokens": tokens, "max_new_tokens": tokens // 4},
                "hardware": hardware}
    training = {"per_device_train_batch_size": batch, "max_seq_length": tokens, "gradient_checkpointing": batch > 1, "bf16": True}
    workload: dict[str, Any] = {"model": {"id": model, "dtype": "bfloat16"}, "training": training, "hardware": hardware}
    if method in ("lora", "qlora"):
        workload["lora"] = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
    if method == "qlora":
        workload["quantization"] = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                                    "bnb_4bit_compute_dtype": "bfloat16"}
        training["optim"] = "paged_adamw_8bit"
    return workload


async def _connection(port: int, payloads: list[bytes], queue: asyncio.Queue[tuple[float, int] | None], latencies: list[float],
                      errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while (item := await queue.get()) is not None:
            due, index = item
            writer.write(payloads[index % len(payloads)])
            status = await read_response(reader)
            latencies.append(time.perf_counter() - due)
            if status != 200:
                errors.append(str(status))
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as error:
        errors.append(type(error).__name__)
    finally:
        writer.close()


async def _watch(pid: int, samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append(rss_mib(pid))
        with contextlib.suppress(TimeoutError):  # a sample a second until told to stop
            await asyncio.wait_for(stop.wait(), timeout=1.0)


async def _phase(port: int, pid: int, phase: Phase, payloads: list[bytes]) -> None:
    latencies: list[float] = []
    errors: list[str] = []
    samples: list[float] = []
    queue: asyncio.Queue[tuple[float, int] | None] = asyncio.Queue()
    stop = asyncio.Event()
    workers = [asyncio.create_task(_connection(port, payloads, queue, latencies, errors)) for _ in range(phase.connections)]
    watcher = asyncio.create_task(_watch(pid, samples, stop))
    cpu_before, start = cpu_seconds(pid), time.perf_counter()
    total = int(phase.target_rps * phase.seconds)
    for i in range(total):
        due = start + i / phase.target_rps
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((due, i))
    phase.sent = total
    for _ in workers:
        queue.put_nowait(None)
    done, pending = await asyncio.wait(workers, timeout=DRAIN_S)
    for task in pending:
        task.cancel()
    elapsed = time.perf_counter() - start
    phase.server_cpu_percent = round(100 * (cpu_seconds(pid) - cpu_before) / elapsed, 1)
    stop.set()
    await watcher
    phase.answered = len(latencies)
    phase.http_errors = sum(1 for error in errors if error.isdigit())
    phase.unanswered = total - len(latencies)
    phase.errors = phase.http_errors + phase.unanswered
    phase.achieved_rps = round(len(latencies) / elapsed, 1)
    ordered = sorted(latencies) or [float("nan")]

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    phase.p50_ms, phase.p90_ms, phase.p99_ms, phase.max_ms = pick(0.50), pick(0.90), pick(0.99), round(ordered[-1] * 1000, 2)
    phase.rss_samples_mib = [round(sample, 1) for sample in samples]
    phase.rss_mib = {"start": round(samples[0], 1), "middle": round(samples[len(samples) // 2], 1), "end": round(samples[-1], 1),
                     "max": round(max(samples), 1)}


def run(rates: list[float], seconds: float, connections: int, bodies: int) -> tuple[list[Phase], float]:
    workloads = [QLORA_T4] if bodies == 1 else mixed_workloads(bodies)
    port = free_port()
    payloads = [request_bytes(port, workload) for workload in workloads]
    server = start_server(port)
    try:
        wait_until_up(port)
        # warm-up, not reported: every body once (the memo caches fill once; what follows is steady state)
        warmup_s = max(3.0, len(payloads) / WARMUP_RPS)
        asyncio.run(_phase(port, server.pid, Phase(target_rps=WARMUP_RPS, seconds=warmup_s, connections=8), payloads))
        rss_after_warmup = rss_mib(server.pid)
        phases = []
        for rate in rates:
            phase = Phase(target_rps=rate, seconds=seconds, connections=connections)
            asyncio.run(_phase(port, server.pid, phase, payloads))
            phases.append(phase)
    finally:
        server.terminate()
        server.wait(timeout=10)
    return phases, rss_after_warmup


def print_report(phases: list[Phase], rss_after_warmup: float) -> None:
    print("| target req/s | seconds | sent | answered | errors (non-200 + unanswered) | achieved req/s | p50 ms | p90 ms | p99 ms | max ms | server CPU | "
          "RSS start / middle / end / max (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for p in phases:
        rss = p.rss_mib
        print(f"| {p.target_rps:g} | {p.seconds:g} | {p.sent} | {p.answered} | {p.errors} ({p.http_errors} + {p.unanswered}) | {p.achieved_rps} | {p.p50_ms} | {p.p90_ms} | "
              f"{p.p99_ms} | {p.max_ms} | {p.server_cpu_percent}% | {rss['start']} / {rss['middle']} / {rss['end']} / {rss['max']} |")
    print(f"\nserver RSS after warm-up: {rss_after_warmup:.1f} MiB; latency is measured from each request's due time (open loop)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[TARGET_RPS, 0.8 * TARGET_RPS, TARGET_RPS / 2],
                        help="arrival rates, one phase each: 2x, 1.6x and 1x the 500/s target")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    parser.add_argument("--connections", type=int, default=64, help="keep-alive connections the requests are spread over")
    parser.add_argument("--bodies", type=int, default=2000,
                        help="distinct workloads the requests cycle through (mixed_workloads); 1: the OpenAPI example only")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    args = parser.parse_args()
    phases, rss_after_warmup = run(args.rates, args.seconds, args.connections, args.bodies)
    workload = ("QLoRA of meta-llama/Llama-2-7b-hf on a T4 (the OpenAPI example), every request" if args.bodies == 1 else
                f"{args.bodies} distinct workloads in turn (mixed_workloads: {len(METHODS)} methods x catalog models x {len(GPUS)} GPUs x batch x length)")
    report = {"endpoint": "POST /api/v1/estimate", "workload": workload, "bodies": args.bodies,
              "open_loop": True, "drain_s": DRAIN_S, "rss_after_warmup_mib": round(rss_after_warmup, 1),
              "phases": [asdict(phase) for phase in phases], "machine": machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(phases, rss_after_warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
