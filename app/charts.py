"""Charts drawn on the server as inline SVG: the breakdown of the peak by term as a stacked bar with
the GPU's usable memory marked, and the peak against micro-batch size and against sequence length
with the limit line; and the allocated and reserved bytes over a simulated step's events.

Pure functions: data in, an SVG string (every text escaped) or plain data for the template out. The
sweeps call the estimator, which is pure too. SVG uses presentation attributes, never ``style``, so
a strict Content-Security-Policy does not blank it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from typing import Any

from app.catalog import Catalog
from app.estimator.estimate import estimate
from app.units import GIB
from app.workload import Task, Workload

TERM_LABELS = {
    "weights": "Weights", "quantization_constants": "Quantization constants", "lora_adapters": "LoRA adapters",
    "master_weights": "Master weights", "optimizer_states": "Optimizer states", "gradients": "Gradients",
    "communication_buffers": "Communication buffers", "activations": "Activations", "logits_and_loss": "Logits and loss",
    "autocast_weight_cache": "Autocast weight cache", "transient": "Transient buffers", "kv_cache": "KV cache",
    "cublas_workspace": "cuBLAS workspace", "allocator_reserve": "Allocator reserve", "cuda_context": "CUDA context",
    "rotary_caches": "Rotary tables",
}
TERM_COLORS = {
    "weights": "#3b6fb6", "quantization_constants": "#7aa6e0", "lora_adapters": "#8e5cc2", "master_weights": "#1f4e8c",
    "optimizer_states": "#d9822b", "gradients": "#e4b23c", "communication_buffers": "#b07d48", "activations": "#3a9d6a",
    "logits_and_loss": "#7cc48f", "autocast_weight_cache": "#5b8c85", "transient": "#c9566b", "kv_cache": "#2f9eb0",
    "cublas_workspace": "#9aa5b1", "allocator_reserve": "#b8c0c9", "cuda_context": "#6b7785",
}
FALLBACK_COLOR = "#a0a0a0"
LIMIT_COLOR = "#c62828"
MICRO_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
SEQ_LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclass(frozen=True)
class Segment:
    """One term of the breakdown: its name, label, bytes and color."""

    name: str
    label: str
    num_bytes: int
    color: str


@dataclass(frozen=True)
class Point:
    """The estimated peak at one value of a swept knob."""

    x: int
    peak_bytes: int
    fits: bool


def label_term(name: str) -> str:
    """``logits_and_loss`` -> ``Logits and loss``."""
    return TERM_LABELS.get(name) or name.replace("_", " ").capitalize()


def breakdown_segments(terms: dict[str, int]) -> list[Segment]:
    """The non-zero terms, in the estimator's order, with labels and colors."""
    return [Segment(name, label_term(name), value, TERM_COLORS.get(name, FALLBACK_COLOR)) for name, value in terms.items() if value > 0]


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f} GiB"


def _nice_step(top: float, ticks: int = 5) -> float:
    """A round tick step (1, 2, 2.5 or 5 x 10^k) giving about ``ticks`` ticks up to ``top``."""
    raw = max(top, 1e-9) / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(step * magnitude for step in (1, 2, 2.5, 5, 10) if step * magnitude >= raw)


def _ticks_gib(top_bytes: float) -> list[float]:
    step = _nice_step(top_bytes / GIB)
    return [i * step for i in range(int(top_bytes / GIB / step) + 1)]


def breakdown_bar(terms: dict[str, int], usable_bytes: int, width: int = 760) -> str:
    """A horizontal stacked bar of ``terms`` with a marker at ``usable_bytes``, in GiB."""
    segments = breakdown_segments(terms)
    peak = sum(segment.num_bytes for segment in segments)
    left, right, top, bar_h = 12, 24, 30, 40
    scale_bytes = max(peak, usable_bytes, 1) * 1.04
    span = width - left - right

    def xpos(num_bytes: float) -> float:
        return left + span * num_bytes / scale_bytes

    parts, offset = [], 0
    for segment in segments:
        x0, x1 = xpos(offset), xpos(offset + segment.num_bytes)
        offset += segment.num_bytes
        parts.append(f'<rect class="seg" x="{x0:.1f}" y="{top}" width="{max(x1 - x0, 0.5):.1f}" height="{bar_h}" fill="{segment.color}">'
                     f"<title>{escape(segment.label)}: {_gib(segment.num_bytes)}</title></rect>")
    axis_y = top + bar_h + 16
    for tick in _ticks_gib(scale_bytes):
        x = xpos(tick * GIB)
        parts.append(f'<line x1="{x:.1f}" y1="{top + bar_h}" x2="{x:.1f}" y2="{top + bar_h + 4}" stroke="#6b7785"/>'
                     f'<text class="tick" x="{x:.1f}" y="{axis_y}" text-anchor="middle">{tick:g}</text>')
    limit_x = xpos(usable_bytes)
    anchor = "end" if limit_x > width * 0.6 else "start"
    dx = -4 if anchor == "end" else 4
    parts.append(f'<line class="limit" x1="{limit_x:.1f}" y1="{top - 14}" x2="{limit_x:.1f}" y2="{top + bar_h + 4}" '
                 f'stroke="{LIMIT_COLOR}" stroke-width="2" stroke-dasharray="5 3"/>'
                 f'<text class="limit-label" x="{limit_x + dx:.1f}" y="{top - 8}" text-anchor="{anchor}" fill="{LIMIT_COLOR}">'
                 f"usable {_gib(usable_bytes)}</text>")
    parts.append(f'<text class="axis-label" x="{left + span:.1f}" y="{axis_y + 16}" text-anchor="end">GiB</text>')
    height = axis_y + 22
    summary = f"Peak {_gib(peak)} against {_gib(usable_bytes)} usable"
    return (f'<svg class="chart breakdown" viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="{escape(summary)}" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{escape(summary)}</title>{"".join(parts)}</svg>')


def _with_knob(workload: Workload, axis: str, value: int) -> Workload:
    if workload.task is Task.inference:
        name = "batch_size" if axis == "micro_batch" else "prompt_tokens"
        return workload.model_copy(update={"inference": workload.inference.model_copy(update={name: value})})
    name = "per_device_train_batch_size" if axis == "micro_batch" else "max_seq_length"
    return workload.model_copy(update={"training": workload.training.model_copy(update={name: value})})


def current_value(workload: Workload, axis: str) -> int:
    """The workload's own value of the swept knob."""
    if workload.task is Task.inference:
        return workload.inference.batch_size if axis == "micro_batch" else workload.inference.prompt_tokens
    return workload.training.per_device_train_batch_size if axis == "micro_batch" else workload.training.max_seq_length


def sweep(workload: Workload, catalog: Catalog, axis: str) -> list[Point]:
    """The peak at each micro-batch size (``axis="micro_batch"``) or sequence length (``"seq_len"``),
    the workload's own value included. Values the estimator refuses are left out."""
    values = sorted({*(MICRO_BATCH_SIZES if axis == "micro_batch" else SEQ_LENGTHS), current_value(workload, axis)})
    points = []
    for value in values:
        try:
            result = estimate(_with_knob(workload, axis, value), catalog)
        except (ValueError, LookupError):
            continue
        points.append(Point(value, result.peak_bytes, result.fits))
    return points


def _y_top(points: list[Point], usable_bytes: int, current: int) -> float:
    """The top of the y axis: every point when they fit on about twice the limit, else the limit and
    the current point with room to spare (points above are drawn at the top edge)."""
    highest = max(point.peak_bytes for point in points)
    current_peak = next((point.peak_bytes for point in points if point.x == current), highest)
    return max(min(highest, max(2 * usable_bytes, 1.25 * current_peak)), usable_bytes) * 1.08


def line_chart(points: list[Point], usable_bytes: int, current: int, x_label: str, width: int = 380, height: int = 230) -> str:
    """Peak (GiB) against a knob, one evenly spaced column per value, with the usable-memory line."""
    if not points:
        return ""
    left, right, top, bottom = 46, 12, 14, 44
    span_x, span_y = width - left - right, height - top - bottom
    top_bytes = _y_top(points, usable_bytes, current)

    def xpos(index: int) -> float:
        return left + (span_x * (index + 0.5) / len(points))

    def ypos(num_bytes: float) -> float:
        return top + span_y * (1 - min(num_bytes, top_bytes) / top_bytes)

    parts = [_grid_and_limit(ypos, top_bytes, usable_bytes, left, width - right)]
    for i in range(len(points) - 1):  # no line between two points that are both above the scale
        a, b = points[i], points[i + 1]
        if a.peak_bytes <= top_bytes or b.peak_bytes <= top_bytes:
            parts.append(f'<line class="trend" x1="{xpos(i):.1f}" y1="{ypos(a.peak_bytes):.1f}" x2="{xpos(i + 1):.1f}" '
                         f'y2="{ypos(b.peak_bytes):.1f}" stroke="#3b6fb6" stroke-width="2"/>')
    for i, point in enumerate(points):
        parts.append(_marker(xpos(i), ypos(point.peak_bytes), point, point.x == current, off_scale=point.peak_bytes > top_bytes))
        parts.append(f'<text class="tick" x="{xpos(i):.1f}" y="{height - bottom + 16}" text-anchor="middle">{_short(point.x)}</text>')
    parts.append(f'<text class="axis-label" x="{left + span_x / 2:.1f}" y="{height - 8}" text-anchor="middle">{escape(x_label)}</text>'
                 f'<text class="axis-label" x="12" y="{top + span_y / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {top + span_y / 2:.1f})">peak GiB</text>')
    summary = f"Peak memory against {x_label}; usable {_gib(usable_bytes)}"
    return (f'<svg class="chart sweep" viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="{escape(summary)}" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{escape(summary)}</title>{"".join(parts)}</svg>')


def _grid_and_limit(ypos: Callable[[float], float], top_bytes: float, usable_bytes: int, x0: float, x1: float) -> str:
    parts = []
    for tick in _ticks_gib(top_bytes):
        y = ypos(tick * GIB)
        parts.append(f'<line class="grid" x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#e3e7ec"/>'
                     f'<text class="tick" x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
    limit_y = ypos(usable_bytes)
    parts.append(f'<line class="limit" x1="{x0}" y1="{limit_y:.1f}" x2="{x1}" y2="{limit_y:.1f}" '
                 f'stroke="{LIMIT_COLOR}" stroke-width="1.5" stroke-dasharray="5 3"/>'
                 f'<text class="limit-label" x="{x1}" y="{limit_y - 5:.1f}" text-anchor="end" fill="{LIMIT_COLOR}">'
                 f"usable {_gib(usable_bytes)}</text>")
    return "".join(parts)


def _marker(x: float, y: float, point: Point, is_current: bool, off_scale: bool) -> str:
    """A dot per value (green fits, red does not; ringed for the form's value); a triangle when off the scale."""
    fill = "#2e7d32" if point.fits else LIMIT_COLOR
    title = f"<title>{point.x:,}: {_gib(point.peak_bytes)}</title>"
    css = "fits" if point.fits else "over"
    if off_scale:
        return f'<path class="{css} off-scale" d="M{x - 5:.1f},{y + 6:.1f} L{x + 5:.1f},{y + 6:.1f} L{x:.1f},{y - 2:.1f} Z" fill="{fill}">{title}</path>'
    ring = ' stroke="#1d2733" stroke-width="2"' if is_current else ""
    return f'<circle class="{css}" cx="{x:.1f}" cy="{y:.1f}" r="{6 if is_current else 3.5}" fill="{fill}"{ring}>{title}</circle>'


def _short(value: int) -> str:
    """``32768`` -> ``32k``; small numbers as they are."""
    return f"{value // 1024}k" if value >= 1024 and value % 1024 == 0 else str(value)


PHASE_COLORS = {"setup": "#9aa5b1", "forward": "#3a9d6a", "loss": "#7cc48f", "backward": "#d9822b", "optimizer": "#8e5cc2"}
ALLOCATED_COLOR, RESERVED_COLOR = "#3b6fb6", "#1d2733"
MAX_TIMELINE_POINTS = 600


def thin_timeline(points: list[dict[str, Any]], limit: int = MAX_TIMELINE_POINTS) -> list[dict[str, Any]]:
    """At most about ``limit`` points: of each run of consecutive points, the one with the most
    reserved (then allocated) bytes, so no peak is lost; the first and last points are kept."""
    if len(points) <= limit:
        return points
    size = math.ceil(len(points) / limit)
    kept = [max(points[i:i + size], key=lambda p: (p["reserved_bytes"], p["allocated_bytes"])) for i in range(0, len(points), size)]
    head = [] if kept[0] is points[0] else [points[0]]
    tail = [] if kept[-1] is points[-1] else [points[-1]]
    return head + kept + tail


def phase_runs(points: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """Consecutive points of one phase as ``(phase, first index, last index)``."""
    runs: list[tuple[str, int, int]] = []
    for index, point in enumerate(points):
        phase = point.get("phase") or "other"
        if runs and runs[-1][0] == phase:
            runs[-1] = (phase, runs[-1][1], index)
        else:
            runs.append((phase, index, index))
    return runs


def timeline_chart(points: list[dict[str, Any]], usable_bytes: int, width: int = 760, height: int = 260) -> str:
    """Allocated and reserved bytes (GiB) over the simulated step's allocator events, phases shaded,
    with the usable-memory line. ``points`` are ``{event, allocated_bytes, reserved_bytes, phase}``."""
    points = thin_timeline(points)
    if not points:
        return ""
    left, right, top, bottom = 46, 12, 30, 40
    span_x, span_y = width - left - right, height - top - bottom
    first, last = points[0]["event"], max(points[-1]["event"], points[0]["event"] + 1)
    top_bytes = max(max(point["reserved_bytes"] for point in points), usable_bytes, 1) * 1.08

    def xpos(event: int) -> float:
        return left + span_x * (event - first) / (last - first)

    def ypos(num_bytes: float) -> float:
        return top + span_y * (1 - num_bytes / top_bytes)

    parts = [_phase_bands(points, xpos, top, span_y, left + span_x), _grid_and_limit(ypos, top_bytes, usable_bytes, left, width - right)]
    for key, color, css in (("reserved_bytes", RESERVED_COLOR, "reserved"), ("allocated_bytes", ALLOCATED_COLOR, "allocated")):
        coords = " ".join(f"{xpos(point['event']):.1f},{ypos(point[key]):.1f}" for point in points)
        parts.append(f'<polyline class="{css}" points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
    parts.append(f'<line x1="{left}" y1="10" x2="{left + 18}" y2="10" stroke="{ALLOCATED_COLOR}" stroke-width="2"/>'
                 f'<text class="tick" x="{left + 22}" y="14">allocated</text>'
                 f'<line x1="{left + 90}" y1="10" x2="{left + 108}" y2="10" stroke="{RESERVED_COLOR}" stroke-width="2"/>'
                 f'<text class="tick" x="{left + 112}" y="14">reserved</text>'
                 f'<text class="axis-label" x="{left + span_x / 2:.1f}" y="{height - 8}" text-anchor="middle">allocator events in the step</text>'
                 f'<text class="axis-label" x="12" y="{top + span_y / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {top + span_y / 2:.1f})">GiB</text>')
    peak = max(point["reserved_bytes"] for point in points)
    summary = f"Memory over one simulated step: reserved peak {_gib(peak)}; usable {_gib(usable_bytes)}"
    return (f'<svg class="chart timeline-chart" viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="{escape(summary)}" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{escape(summary)}</title>{"".join(parts)}</svg>')


def _phase_bands(points: list[dict[str, Any]], xpos: Callable[[int], float], top: float, span_y: float, x_end: float) -> str:
    """A shaded band per run of one phase, from its first point to the next run's, labelled when wide enough."""
    parts = []
    runs = phase_runs(points)
    for number, (phase, start, _end) in enumerate(runs):
        x0 = xpos(points[start]["event"])
        x1 = xpos(points[runs[number + 1][1]]["event"]) if number + 1 < len(runs) else x_end
        color = PHASE_COLORS.get(phase, FALLBACK_COLOR)
        parts.append(f'<rect class="phase" x="{x0:.1f}" y="{top}" width="{max(x1 - x0, 0.5):.1f}" height="{span_y}" '
                     f'fill="{color}" fill-opacity="0.12"><title>{escape(phase)}</title></rect>')
        if x1 - x0 >= 8 * len(phase):
            parts.append(f'<text class="phase-label" x="{(x0 + x1) / 2:.1f}" y="{top + span_y - 4:.1f}" text-anchor="middle" fill="{color}">{escape(phase)}</text>')
    return "".join(parts)
