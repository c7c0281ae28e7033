"""API latency and throughput on loopback: POST /api/v1/estimate against uvicorn with one worker,
and the first render of ``/``.

    python bench/bench_api.py [--seconds 15] [--concurrency 8] [--out bench/results/api.json]

Starts ``uvicorn app.main:create_app --factory --workers 1`` on a free 127.0.0.1 port, then runs a
small asyncio HTTP/1.1 keep-alive client (raw sockets, so the client costs little of the machine's
CPU): first one connection (latency: the time a single caller waits), then ``--concurrency``
connections (throughput). Bounded in time. Targets (issue 6): p50 < 5 ms, p99 < 25 ms,
>= 500 requests/s, first render of / < 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.schemas import QLORA_T4  # noqa: E402  (the OpenAPI example: QLoRA of Llama-2-7B on a T4)

TARGETS = {"p50_ms": 5.0, "p99_ms": 25.0, "requests_per_s": 500.0, "first_render_ms": 100.0}


@dataclass
class Phase:
    name: str
    connections: int
    seconds: float
    requests: int
    errors: int
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--log-level", "warning", "--no-access-log"]
    return subprocess.Popen(command, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})


def wait_until_up(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/api/v1/healthz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the server did not start")


def time_page(port: int, repeats: int = 20) -> dict[str, float]:
    """The first GET / (templates compiled on first use) and the median of the next ``repeats``."""
    connection = http.client.HTTPConnection("127.0.0.1", port)
    timings = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        connection.request("GET", "/")
        response = connection.getresponse()
        body = response.read()
        timings.append((time.perf_counter() - start) * 1000)
        assert response.status == 200 and b'id="verdict"' in body
    return {"first_render_ms": round(timings[0], 1), "warm_render_ms_p50": round(statistics.median(timings[1:]), 1),
            "page_bytes": len(body)}


def request_bytes(port: int, workload: dict[str, Any] = QLORA_T4) -> bytes:
    """A whole HTTP/1.1 ``POST /api/v1/estimate`` of ``workload``, ready to write to a socket."""
    body = json.dumps(workload).encode()
    head = (f"POST /api/v1/estimate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> int:
    """Reads one HTTP/1.1 response with a Content-Length (all the server sends) and returns its status."""
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def _client(port: int, payload: bytes, deadline: float, latencies: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            writer.write(payload)
            status = await read_response(reader)
            latencies.append(time.perf_counter() - start)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


async def _load(port: int, connections: int, seconds: float) -> tuple[list[float], list[int], float]:
    payload, latencies, errors = request_bytes(port), [], []
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(_client(port, payload, deadline, latencies, errors) for _ in range(connections)))
    return latencies, errors, time.perf_counter() - start


def run_phase(name: str, port: int, connections: int, seconds: float) -> Phase:
    latencies, errors, elapsed = asyncio.run(_load(port, connections, seconds))
    ordered = sorted(latencies)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return Phase(name, connections, round(elapsed, 1), len(latencies), len(errors), round(len(latencies) / elapsed, 1),
                 pick(0.50), pick(0.90), pick(0.99), round(ordered[-1] * 1000, 2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="total load time, split 1/3 latency, 2/3 throughput")
    parser.add_argument("--concurrency", type=int, default=8, help="connections in the throughput phase")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "api.json")
    args = parser.parse_args()
    port = free_port()
    server = start_server(port)
    try:
        wait_until_up(port)
        page = time_page(port)
        run_phase("warm-up", port, 2, 1.0)
        phases = [run_phase("latency", port, 1, args.seconds / 3), run_phase("throughput", port, args.concurrency, 2 * args.seconds / 3)]
    finally:
        server.terminate()
        server.wait(timeout=10)
    report = {"endpoint": "POST /api/v1/estimate", "workload": "QLoRA of meta-llama/Llama-2-7b-hf on a T4", "page": page,
              "phases": [asdict(phase) for phase in phases], "targets": TARGETS, "machine": machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(page, phases)
    return 0 if verdicts(page, phases) else 1


def machine() -> dict[str, str | int | None]:
    def installed(name: str) -> str | None:
        try:
            return version(name)
        except Exception:
            return None

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "uvicorn": installed("uvicorn"), "fastapi": installed("fastapi"), "pydantic": installed("pydantic"),
            "httptools": installed("httptools"), "uvloop": installed("uvloop")}


def verdicts(page: dict[str, float], phases: list[Phase]) -> bool:
    latency, throughput = phases
    checks = [latency.p50_ms < TARGETS["p50_ms"], latency.p99_ms < TARGETS["p99_ms"],
              throughput.requests_per_s >= TARGETS["requests_per_s"], page["first_render_ms"] < TARGETS["first_render_ms"],
              latency.errors == throughput.errors == 0]
    return all(checks)


def print_report(page: dict[str, float], phases: list[Phase]) -> None:
    print("| phase | connections | requests | errors | req/s | p50 ms | p90 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for phase in phases:
        print(f"| {phase.name} | {phase.connections} | {phase.requests} | {phase.errors} | {phase.requests_per_s} | {phase.p50_ms} | "
              f"{phase.p90_ms} | {phase.p99_ms} | {phase.max_ms} |")
    print(f"\nGET / first render: {page['first_render_ms']} ms; warm p50 {page['warm_render_ms_p50']} ms ({page['page_bytes']} bytes)")
    print(f"targets: p50 < {TARGETS['p50_ms']} ms, p99 < {TARGETS['p99_ms']} ms (one connection); "
          f">= {TARGETS['requests_per_s']} req/s; / < {TARGETS['first_render_ms']} ms: {'met' if verdicts(page, phases) else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
