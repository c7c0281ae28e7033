"""``vramplan``: the command line, a thin shell over the estimator (and planner, exporter, server).

Exit codes: 0 success (``check``: it fits), 1 ``check``: it does not fit, 2 bad input (one line on
stderr, never a traceback), 3 the Hugging Face Hub could not answer for a model id outside the catalog
(unreachable, busy, gated: worth a retry or an HF_TOKEN, not a change of input).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.catalog import Catalog, load_catalog
from app.errors import CONFIG_FAULTS, UserInputError, format_validation_error
from app.estimator.estimate import Estimate, describe, estimate
from app.hub import HubConfigs, HubError, resolve_model_source
from app.jsonlimits import JSONLimitError, parse_json
from app.settings import Settings
from app.simulation import simulate_report
from app.units import GB, GIB
from app.workload import Workload

EXIT_OK, EXIT_NO_FIT, EXIT_BAD_INPUT, EXIT_HUB = 0, 1, 2, 3
MAX_WORKLOAD_FILE_BYTES = 1 << 20


def _add_workload_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for the common Workload fields; ``--workload FILE`` gives a whole Workload (flags override it)."""
    parser.add_argument("--workload", type=Path, help="a Workload JSON file (flags below override its fields)")
    parser.add_argument("--model", help="Hugging Face model id: from the catalog (`vramplan models`) or any on the Hub (its config.json)")
    parser.add_argument("--config", type=Path, help="a model's config.json instead of --model")
    parser.add_argument("--num-parameters", type=float, help="a bare parameter count (model states only)")
    parser.add_argument("--dtype", help="dtype the weights are loaded in: float32, bfloat16, float16, int8")
    parser.add_argument("--gpu", help="GPU id or alias: T4, A100-80GB, 4090, nvidia-l4-24gb, ...")
    parser.add_argument("--num-gpus", type=int)
    parser.add_argument("--method", choices=["full", "lora", "qlora", "int8-lora", "inference"])
    parser.add_argument("--batch-size", type=int, help="per_device_train_batch_size (or inference batch size)")
    parser.add_argument("--seq-len", type=int, help="max_seq_length (or inference prompt tokens)")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--grad-accum", type=int, help="gradient_accumulation_steps")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--optim", help="TrainingArguments optim: adamw_torch, adamw_8bit, paged_adamw_32bit, ...")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--attn", help="attn_implementation: sdpa, eager, flash_attention_2")
    parser.add_argument("--lora-r", type=int)
    parser.add_argument("--lora-targets", help="comma-separated module names, or all-linear")
    parser.add_argument("--dora", action=argparse.BooleanOptionalAction, default=None, help="DoRA (LoraConfig use_dora)")
    parser.add_argument("--strategy", choices=["none", "ddp", "zero1", "zero2", "zero3", "fsdp"])
    parser.add_argument("--json", action="store_true", help="print JSON")


def _read_json_file(path: Path, what: str) -> Any:
    try:
        if path.stat().st_size > MAX_WORKLOAD_FILE_BYTES:
            raise UserInputError(f"{what} {path} is larger than {MAX_WORKLOAD_FILE_BYTES} bytes")
        return parse_json(path.read_bytes(), f"{what} {path}")
    except OSError as error:
        raise UserInputError(f"cannot read {what} {path}: {error.strerror}") from error
    except JSONLimitError as error:
        raise UserInputError(str(error)) from error


def _method_blocks(method: str, data: dict[str, Any], lora_r: int | None, targets: str | None) -> None:
    if method == "inference":
        data["task"] = "inference"
        return
    data["task"] = "train"
    if method in ("lora", "qlora", "int8-lora"):
        lora = data.setdefault("lora", {})
        lora.setdefault("r", 16)
        lora.setdefault("target_modules", "all-linear")
    if method == "qlora":
        data["quantization"] = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                                **(data.get("quantization") or {})}
    if method == "int8-lora":
        data["quantization"] = {"load_in_8bit": True}
    if method == "full":
        data.pop("lora", None)
        data.pop("quantization", None)


def workload_from_args(args: argparse.Namespace) -> Workload:
    """Build a Workload from ``--workload`` and the flags; UserInputError says what is wrong."""
    data: dict[str, Any] = _read_json_file(args.workload, "workload file") if args.workload else {}
    if not isinstance(data, dict):
        raise UserInputError("the workload file must hold a JSON object")
    model = dict(data.get("model") or {})
    if args.model or args.config or args.num_parameters:
        model = {k: v for k, v in model.items() if k in ("dtype", "torch_dtype")}
    if args.model:
        model["id"] = args.model
    if args.config:
        model["config"] = _read_json_file(args.config, "config file")
    if args.num_parameters:
        model["num_parameters"] = int(args.num_parameters)
    if args.dtype:
        model.pop("torch_dtype", None)
        model["dtype"] = args.dtype
    data["model"] = model
    _apply_flags(args, data)
    try:
        return Workload.model_validate(data)
    except ValidationError as error:
        raise UserInputError(format_validation_error(error)) from error


def resolved_workload(args: argparse.Namespace, catalog: Catalog) -> Workload:
    """``workload_from_args``, with a model id outside the catalog replaced by its config.json from
    the Hub (settings from VRAMPLAN_* variables; HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE honoured)."""
    return resolve_model_source(workload_from_args(args), catalog, HubConfigs(Settings()))


def _apply_flags(args: argparse.Namespace, data: dict[str, Any]) -> None:
    training = dict(data.get("training") or {})
    inference = dict(data.get("inference") or {})
    hardware = dict(data.get("hardware") or {})
    if args.method:
        _method_blocks(args.method, data, args.lora_r, args.lora_targets)
    if args.lora_r is not None or args.lora_targets or args.dora is not None:
        lora = data.setdefault("lora", {}) or {}
        data["lora"] = lora
        if args.lora_r is not None:
            lora["r"] = args.lora_r
        if args.lora_targets:
            lora["target_modules"] = args.lora_targets
        if args.dora is not None:
            lora["use_dora"] = args.dora
    is_inference = data.get("task") == "inference"
    _set(training if not is_inference else inference, "per_device_train_batch_size" if not is_inference else "batch_size", args.batch_size)
    _set(training if not is_inference else inference, "max_seq_length" if not is_inference else "prompt_tokens", args.seq_len)
    _set(inference, "max_new_tokens", args.max_new_tokens)
    _set(training, "gradient_accumulation_steps", args.grad_accum)
    _set(training, "gradient_checkpointing", args.gradient_checkpointing)
    _set(training, "optim", args.optim)
    _set(training, "attn_implementation", args.attn)
    if args.precision:
        training["bf16"] = args.precision == "bf16"
        training["fp16"] = args.precision == "fp16"
    _set(hardware, "gpu", args.gpu)
    _set(hardware, "num_gpus", args.num_gpus)
    if args.strategy:
        data["distributed"] = {**(data.get("distributed") or {}), "strategy": args.strategy}
    data["training"], data["inference"], data["hardware"] = training, inference, hardware


def _set(block: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        block[key] = value


def format_estimate(result: Estimate) -> str:
    """A table of terms in GiB and GB, then the verdict and warnings."""
    lines = [
        f"{result.model} on {result.num_gpus} x {result.gpu_name} ({result.method}, {result.precision})",
        f"{'term':<26}{'GiB':>10}{'GB':>10}",
    ]
    for name, value in result.terms.items():
        if value:
            lines.append(f"{name:<26}{value / GIB:>10.2f}{value / GB:>10.2f}")
    lines.append(f"{'allocated peak':<26}{result.allocated_peak_bytes / GIB:>10.2f}{result.allocated_peak_bytes / GB:>10.2f}")
    lines.append(f"{'reserved peak':<26}{result.reserved_peak_bytes / GIB:>10.2f}{result.reserved_peak_bytes / GB:>10.2f}")
    lines.append(f"{'peak (nvidia-smi)':<26}{result.peak_bytes / GIB:>10.2f}{result.peak_bytes / GB:>10.2f}")
    lines.append(f"{'GPU memory':<26}{result.usable_bytes / GIB:>10.2f}{result.usable_bytes / GB:>10.2f}")
    lines.append(f"parameters: {result.num_parameters:,} (trainable {result.trainable_parameters:,}); peak during {result.peak_phase}")
    lines.append(describe(result))
    lines += [f"warning: {text}" for text in result.warnings]
    return "\n".join(lines)


def cmd_estimate(args: argparse.Namespace, catalog: Catalog) -> int:
    result = estimate(resolved_workload(args, catalog), catalog)
    print(result.model_dump_json(indent=2) if args.json else format_estimate(result))
    return EXIT_OK


def cmd_check(args: argparse.Namespace, catalog: Catalog) -> int:
    result = estimate(resolved_workload(args, catalog), catalog)
    if args.json:
        print(json.dumps({"fits": result.fits, "verdict": result.verdict, "peak_bytes": result.peak_bytes,
                          "usable_bytes": result.usable_bytes, "headroom_bytes": result.headroom_bytes}))
    else:
        print(describe(result))
    return EXIT_OK if result.fits else EXIT_NO_FIT


def cmd_models(args: argparse.Namespace, catalog: Catalog) -> int:
    from app.estimator.model import resolve_model
    from app.workload import ModelSpec

    rows = []
    for model_id, profile in sorted(catalog.models.items()):
        resolved = resolve_model(ModelSpec(id=model_id), catalog)
        total = sum(m.numel for m in resolved.modules)
        rows.append({"id": model_id, "model_type": profile.config.get("model_type"), "num_parameters": total})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['id']:<45}{row['model_type']:<14}{row['num_parameters'] / 1e9:>9.2f} B")
    return EXIT_OK


def cmd_gpus(args: argparse.Namespace, catalog: Catalog) -> int:
    gpus = sorted(catalog.gpus.values(), key=lambda g: g.memory_bytes)
    if args.json:
        print(json.dumps([g.model_dump() for g in gpus], indent=2))
    else:
        for gpu in gpus:
            flags = ",".join(name for name in ("bf16", "flash_attention_2") if getattr(gpu, name))
            print(f"{gpu.id:<26}{gpu.name:<34}{gpu.memory_bytes / GIB:>8.1f} GiB  {', '.join(gpu.aliases[:3]):<30}{flags}")
    return EXIT_OK


def cmd_profile_import(args: argparse.Namespace, catalog: Catalog) -> int:
    from app.profiles import import_profile

    config = _read_json_file(args.config_file, "config file")
    path = import_profile(config, args.id, args.source, args.out)
    print(f"wrote {path}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace, catalog: Catalog) -> int:
    import uvicorn

    uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port)
    return EXIT_OK


def cmd_plan(args: argparse.Namespace, catalog: Catalog) -> int:
    """The best setups that fit, and why the others do not; exit 1 when none fits."""
    from app.planner import plan
    from app.planner.text import format_plan

    result = plan(resolved_workload(args, catalog), catalog, margin=args.margin, top=args.top)
    print(result.model_dump_json(indent=2) if args.json else format_plan(result))
    return EXIT_OK if result.plans else EXIT_NO_FIT


def cmd_limits(args: argparse.Namespace, catalog: Catalog) -> int:
    """The largest micro-batch and longest sequence that fit this setup."""
    from app.planner import limits
    from app.planner.text import format_limits

    result = limits(resolved_workload(args, catalog), catalog, margin=args.margin)
    print(result.model_dump_json() if args.json else format_limits(result))
    return EXIT_OK


def cmd_fix(args: argparse.Namespace, catalog: Catalog) -> int:
    """The cheapest changes that make the workload fit; exit 1 when none is found."""
    from app.planner import fixes
    from app.planner.search import budget_bytes
    from app.planner.text import format_fixes

    workload = resolved_workload(args, catalog)
    before = estimate(workload, catalog)
    found = fixes(workload, catalog, margin=args.margin)
    budget = budget_bytes(before.usable_bytes, args.margin)
    if args.json:
        print(json.dumps({"peak_bytes": before.peak_bytes, "budget_bytes": budget,
                          "fixes": [fix.model_dump(mode="json") for fix in found]}, indent=2))
    else:
        print(format_fixes(found, before.peak_bytes, budget))
    return EXIT_OK if found or before.peak_bytes <= budget else EXIT_NO_FIT


def cmd_export(args: argparse.Namespace, catalog: Catalog) -> int:
    """Write train.py, config.yaml (and the multi-GPU configs) for the workload or its best plan."""
    from app.export import write_files

    workload = resolved_workload(args, catalog)
    if args.plan:
        from app.planner import plan

        result = plan(workload, catalog)
        if not result.plans:
            raise UserInputError("no setup fits, so there is no plan to export (see `vramplan plan`)")
        workload = result.plans[0].workload
    for path in write_files(workload, catalog, args.out):
        print(f"wrote {path}")
    return EXIT_OK


def _add_planner_parsers(sub: Any) -> None:
    for name, help_text in (("plan", "search the setups that fit and rank them"),
                            ("limits", "largest micro-batch and longest sequence that fit"),
                            ("fix", "cheapest changes that make the workload fit")):
        parser = sub.add_parser(name, help=help_text)
        _add_workload_flags(parser)
        parser.add_argument("--margin", type=float, default=0.05 if name == "plan" else 0.0,
                            help="safety margin, a fraction of usable memory (plan: 0.05, others: 0)")
        if name == "plan":
            parser.add_argument("--top", type=int, default=5, help="how many plans to show")
    export = sub.add_parser("export", help="write train.py and configs for the workload (or, with --plan, its best plan)")
    _add_workload_flags(export)
    export.add_argument("--out", type=Path, required=True, help="directory to write into")
    export.add_argument("--plan", action="store_true", help="export the planner's first choice instead of the workload as given")


def cmd_calibrate(args: argparse.Namespace, catalog: Catalog) -> int:
    """Fit calibration coefficients and write them under profiles/calibration/."""
    from app.calibration.fit_published import fit_allocator

    if args.suite:
        from app.calibration.fit import fit

        summary = fit(progress=True, only=args.only)["summary"]
        print(f"{summary['compared']} of {summary['cases']} cases compared; median |error| "
              f"{summary['median_abs_error']:.1%}, worst {summary['max_abs_error']:.1%}; failed: {summary['failed'] or 'none'}")
        return EXIT_OK
    result = fit_allocator()
    print(f"allocator fragmentation fraction: {result['fragmentation_fraction']} "
          f"(with torch_empty_cache_steps: {result['fragmentation_fraction_with_empty_cache']}), "
          f"from {len(result['samples'])} + {len(result['samples_with_empty_cache'])} published runs")
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace, catalog: Catalog) -> int:
    """One simulated step, replayed through the caching allocator model: the three levels."""
    workload = workload_from_args(_simulate_namespace(args))
    if workload.model.num_parameters is not None:
        raise UserInputError("simulation needs the model's architecture: give model.id or model.config")
    config = workload.model.config if workload.model.config is not None else catalog.model(workload.model.id).config
    try:
        report = simulate_report(workload, config, catalog, alloc_conf=args.alloc_conf, timeline=args.timeline)
    except ModuleNotFoundError as error:
        raise UserInputError(f"simulation needs the calibrate extra (pip install 'vramplan[calibrate]'): {error.name}") from error
    if args.json or args.timeline:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    print(f"simulated step: peak of live tensors {report['peak_bytes'] / GIB:.3f} GiB during {report['peak_phase']} "
          f"({report['wall_seconds']:.1f} s)")
    for level in ("allocated_peak_bytes", "reserved_peak_bytes", "device_peak_bytes"):
        if level in report:
            print(f"  {level.removesuffix('_bytes').replace('_', ' '):<22}{report[level] / GIB:>10.3f} GiB{report[level] / GB:>10.3f} GB")
    for name, value in sorted(report["by_category_at_peak"].items(), key=lambda item: -item[1]):
        print(f"  {name:<22}{value / GIB:>10.3f} GiB")
    for note in report["notes"]:
        print(f"note: {note}")
    return EXIT_OK


def _simulate_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """The workload flags ``workload_from_args`` reads, all unset but --workload."""
    parser = argparse.ArgumentParser()
    _add_workload_flags(parser)
    namespace = parser.parse_args([])
    namespace.workload = args.workload
    return namespace


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vramplan", description="Will this LLM job fit in this GPU's memory?")
    sub = parser.add_subparsers(dest="command", required=True)
    calibrate = sub.add_parser("calibrate", help="fit calibration coefficients (profiles/calibration/)")
    calibrate.add_argument("--published", action="store_true", default=True,
                           help="fit the allocator reserve to published runs (bench/published_measurements.json)")
    calibrate.add_argument("--suite", action="store_true",
                           help="simulate the calibration suite and compare the estimator (needs the calibrate extra)")
    calibrate.add_argument("--only", default=None, help="with --suite: rerun the cases whose name contains this, keep the rest")
    simulate = sub.add_parser("simulate", help="simulate one training step under FakeTensorMode (needs the calibrate extra)")
    simulate.add_argument("--workload", type=Path, required=True, help="a Workload JSON file")
    simulate.add_argument("--json", action="store_true", help="print the SimulationResult as JSON")
    simulate.add_argument("--timeline", action="store_true", help="print JSON with the allocated/reserved timeline by phase")
    simulate.add_argument("--alloc-conf", default="", help="PYTORCH_CUDA_ALLOC_CONF to replay with, e.g. expandable_segments:True")
    for name, help_text in (("estimate", "estimate peak GPU memory, term by term"),
                            ("check", "exit 0 if the workload fits, 1 if not (for CI)")):
        _add_workload_flags(sub.add_parser(name, help=help_text))
    for name, help_text in (("models", "list the model catalog"), ("gpus", "list the GPU catalog")):
        sub.add_parser(name, help=help_text).add_argument("--json", action="store_true")
    profile = sub.add_parser("profile", help="manage model profiles").add_subparsers(dest="profile_command", required=True)
    importer = profile.add_parser("import", help="turn a Hugging Face config.json into a profile")
    importer.add_argument("config_file", type=Path)
    importer.add_argument("--id", required=True, help="the model's Hugging Face id, e.g. my-org/my-model")
    importer.add_argument("--source", default=None, help="where the config came from (default: the file path)")
    importer.add_argument("--out", type=Path, default=None, help="profiles folder (default: the catalog's)")
    serve = sub.add_parser("serve", help="run the web app and API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    _add_planner_parsers(sub)
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace, Catalog], int]] = {
    "estimate": cmd_estimate,
    "check": cmd_check,
    "models": cmd_models,
    "gpus": cmd_gpus,
    "profile": cmd_profile_import,
    "serve": cmd_serve,
    "calibrate": cmd_calibrate,
    "simulate": cmd_simulate,
    "plan": cmd_plan,
    "limits": cmd_limits,
    "fix": cmd_fix,
    "export": cmd_export,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args, load_catalog())
    except HubError as error:
        print(f"vramplan: error: {error}", file=sys.stderr)
        return EXIT_HUB
    except (UserInputError, ValueError, LookupError) as error:
        message = error.args[0] if isinstance(error, LookupError) and error.args else str(error)
        print(f"vramplan: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CONFIG_FAULTS as error:  # a config field of a type the estimator cannot use: say so, no traceback
        print(f"vramplan: error: the config has a field whose type or value vramplan cannot use "
              f"({type(error).__name__}: {str(error)[:120]})", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
