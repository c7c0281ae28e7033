"""The JSON API under ``/api/v1``: thin handlers over the estimator, planner and exporter.

Every POST takes a Workload. Errors are ``{"detail": [{"field", "value", "reason"}]}`` with 422 for
bad input and 404 for an unknown model or GPU; no traceback reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import __version__
from app.catalog import Catalog, UnknownGPUError, UnknownModelError
from app.errors import validation_issues
from app.estimator.architecture import ArchitectureError
from app.estimator.estimate import Estimate, describe, estimate
from app.estimator.model import resolve_model
from app.estimator.setup import SetupError
from app.export import export_files, export_zip
from app.hub import HubConfigs, HubError, resolve_model_source
from app.planner import plan
from app.schemas import (
    WORKLOAD_EXAMPLES,
    CheckPublic,
    ErrorPublic,
    EstimatePublic,
    GPUPublic,
    GPUsPublic,
    HealthPublic,
    Issue,
    ModelPublic,
    ModelsPublic,
    ModelSummary,
    PlansPublic,
    SimulationPublic,
    config_fault,
    problem_from,
)
from app.settings import Settings
from app.simulation import SimulationBusy, SimulationTimeout, SimulationUnavailable, Simulator, model_config_for
from app.workload import ModelSpec, Workload

log = logging.getLogger("vramplan.api")

ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorPublic, "description": "unknown model or GPU"},
    413: {"model": ErrorPublic, "description": "request body larger than the server accepts (1 MiB by default)"},
    422: {"model": ErrorPublic, "description": "invalid input: each issue names the field, the value and the reason"},
}
HUB_ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorPublic, "description": "a Hub model that is gated or private (the server needs HF_TOKEN)"},
    502: {"model": ErrorPublic, "description": "the Hub's answer for a model id is not a usable config.json"},
    503: {"model": ErrorPublic, "description": "busy: too many Hub look-ups at once, or the Hub rate-limits; try again"},
    504: {"model": ErrorPublic, "description": "could not reach the Hub in time for a model id outside the catalog"},
}

router = APIRouter(prefix="/api/v1", responses=ERRORS)

# The dependencies below and the estimate/check handlers are ``async def``: FastAPI runs a plain ``def``
# in a worker thread, and that hop (anyio's thread pool, its capacity limiter and cancel scopes) cost
# more CPU than the estimate itself (py-spy under load); server CPU per POST /estimate fell from 1.1-1.2 ms
# to 0.7-0.8 ms (bench/bench_load.py, README Speed).
# Only what cannot block runs on the event loop: an estimate takes 0.1-0.3 ms (bench/bench_estimate.py);
# a Hub look-up, a plan, an export and a simulation stay in the thread pool. /healthz is async too.


async def get_catalog(request: Request) -> Catalog:
    """The catalog loaded once at app start."""
    return request.app.state.catalog


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_simulator(request: Request) -> Simulator:
    """Runs simulated steps, one at a time per worker, each with a time limit."""
    return request.app.state.simulator


async def get_hub(request: Request) -> HubConfigs:
    """Configs of models outside the catalog, fetched from the Hub and cached."""
    return request.app.state.hub


CatalogDep = Annotated[Catalog, Depends(get_catalog)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
HubDep = Annotated[HubConfigs, Depends(get_hub)]
SimulatorDep = Annotated[Simulator, Depends(get_simulator)]
WorkloadBody = Annotated[Workload, Body(openapi_examples=WORKLOAD_EXAMPLES)]


def error_response(status: int, issues: list[Issue] | list[dict[str, str]]) -> JSONResponse:
    detail = [issue.model_dump() if isinstance(issue, Issue) else issue for issue in issues]
    return JSONResponse(status_code=status, content={"detail": detail})


class APIError(Exception):
    """An error the handlers raise with its status and issues already decided."""

    def __init__(self, status: int, issues: list[Issue]) -> None:
        super().__init__(status, issues)
        self.status, self.issues = status, issues


def _answer(error: Exception, workload: Workload | None = None) -> APIError:
    problem = problem_from(error, workload)
    return APIError(problem.status, problem.issues)


@contextmanager
def _answering(workload: Workload, resolved: Workload | None = None) -> Iterator[None]:
    """Errors while answering about ``workload`` (as ``resolved`` from the Hub) become API errors: the
    input's and the Hub's with their status, a config field the estimator cannot use as a 422."""
    try:
        yield
    except (HubError, ValueError, UnknownModelError, UnknownGPUError, SimulationBusy, SimulationTimeout, SimulationUnavailable) as error:
        raise _answer(error, workload) from error
    except Exception as error:
        problem = config_fault(error, resolved or workload)
        if problem is None:
            raise
        log.warning("a config the estimator could not use: %s: %s", type(error).__name__, error)
        raise APIError(problem.status, problem.issues) from error


def _resolved(workload: Workload, catalog: Catalog, hub: HubConfigs) -> Workload:
    """The workload with a model id outside the catalog replaced by its config.json from the Hub."""
    with _answering(workload):
        return resolve_model_source(workload, catalog, hub)


@router.get("/healthz", response_model=HealthPublic, tags=["meta"])
async def healthz(catalog: CatalogDep) -> HealthPublic:
    """Liveness: the app is up and its catalog is loaded."""
    return HealthPublic(status="ok", version=__version__, models=len(catalog.models), gpus=len(catalog.gpus))


def _estimated(workload: Workload, catalog: Catalog, hub: HubConfigs) -> Estimate:
    resolved = _resolved(workload, catalog, hub)
    with _answering(workload, resolved):
        return estimate(resolved, catalog)


async def _estimated_off_loop(workload: Workload, catalog: Catalog, hub: HubConfigs) -> Estimate:
    """``_estimated`` on the event loop for a catalog model (nothing to fetch, 0.1-0.3 ms of CPU); in
    the thread pool when the Hub may be asked or a pasted config (up to the 1 MiB body) checked."""
    if workload.model.config is None and workload.model.id is not None and catalog.has_model(workload.model.id):
        return _estimated(workload, catalog, hub)
    return await run_in_threadpool(_estimated, workload, catalog, hub)


@router.post("/estimate", response_model=EstimatePublic, tags=["estimate"], responses=HUB_ERRORS)
async def post_estimate(workload: WorkloadBody, catalog: CatalogDep, hub: HubDep) -> Any:
    """The per-GPU peak memory of a Workload, term by term (the same JSON as `vramplan estimate --json`)."""
    return await _estimated_off_loop(workload, catalog, hub)


@router.post("/check", response_model=CheckPublic, tags=["estimate"], responses=HUB_ERRORS)
async def post_check(workload: WorkloadBody, catalog: CatalogDep, hub: HubDep) -> CheckPublic:
    """Whether a Workload fits, with its headroom: for CI (fail the job when `fits` is false)."""
    result = await _estimated_off_loop(workload, catalog, hub)
    return CheckPublic(fits=result.fits, verdict=result.verdict, peak_bytes=result.peak_bytes, usable_bytes=result.usable_bytes,
                       headroom_bytes=result.headroom_bytes, message=describe(result))


@router.post("/plan", response_model=PlansPublic, tags=["plan"], responses=HUB_ERRORS)
def post_plan(
    workload: WorkloadBody, catalog: CatalogDep, settings: SettingsDep, hub: HubDep,
    margin: Annotated[float | None, Query(ge=0.0, lt=1.0, description="fraction of GPU memory kept free")] = None,
    top: Annotated[int | None, Query(ge=1, le=50, description="how many plans to return")] = None,
) -> Any:
    """The best setups that fit this model and GPU, ranked, with every rejected setup and why."""
    resolved = _resolved(workload, catalog, hub)
    with _answering(workload, resolved):
        return plan(resolved, catalog, margin=settings.plan_margin if margin is None else margin,
                            top=settings.plan_top if top is None else top)


@router.post("/export", tags=["export"], response_class=Response,
             responses={200: {"content": {"application/zip": {}, "text/plain": {}},
                              "description": "a zip of train.py and its configs, or one file with ?file="}} | HUB_ERRORS)
def post_export(
    workload: WorkloadBody, catalog: CatalogDep, hub: HubDep,
    file: Annotated[str | None, Query(max_length=100, description="one file of the export, e.g. train.py")] = None,
) -> Response:
    """A runnable training script and configs for this Workload: a zip, or one file as text."""
    resolved = _resolved(workload, catalog, hub)
    with _answering(workload, resolved):
        if file is None:
            body = export_zip(resolved, catalog)
            return Response(body, media_type="application/zip", headers={"Content-Disposition": 'attachment; filename="vramplan-export.zip"'})
        files = export_files(resolved, catalog)
    if file not in files:
        raise APIError(404, [Issue(field="file", value=repr(file), reason=f"not part of this export; files: {', '.join(files)}")])
    return PlainTextResponse(files[file], headers={"Content-Disposition": f'inline; filename="{file}"'})


SIMULATION_ERRORS: dict[int | str, dict[str, Any]] = {
    501: {"model": ErrorPublic, "description": "this server lacks the calibrate extra (torch, transformers) the simulation needs"},
    503: {"model": ErrorPublic, "description": "busy: a simulation is already running, or the Hub is busy; try again"},
    504: {"model": ErrorPublic, "description": "the simulation ran past the server's limit (simulate_timeout_s), or the Hub was unreachable"},
}


@router.post("/simulate", response_model=SimulationPublic, tags=["estimate"], responses=HUB_ERRORS | SIMULATION_ERRORS)
def post_simulate(workload: WorkloadBody, catalog: CatalogDep, hub: HubDep, simulator: SimulatorDep) -> Any:
    """One step simulated under FakeTensorMode (seconds to minutes; one at a time): the allocated,
    reserved and device peaks and the memory timeline by phase. The model needs its architecture (an id or a config)."""
    resolved = _resolved(workload, catalog, hub)
    with _answering(workload, resolved):
        usable_bytes = estimate(resolved, catalog).usable_bytes
        report = simulator.run(resolved, model_config_for(resolved, catalog), catalog)
    return report | {"usable_bytes": usable_bytes}


@router.get("/models", response_model=ModelsPublic, tags=["catalog"])
def get_models(catalog: CatalogDep) -> ModelsPublic:
    """Every model profile in the catalog, with its exact parameter count."""
    rows = [_model_summary(catalog, model_id) for model_id in sorted(catalog.models)]
    return ModelsPublic(data=rows, count=len(rows))


@router.get("/models/{model_id:path}", response_model=ModelPublic, tags=["catalog"])
def get_model(model_id: str, catalog: CatalogDep) -> ModelPublic:
    """One model profile: its config.json, source and parameter count."""
    try:
        profile = catalog.model(model_id)
    except UnknownModelError as error:
        raise APIError(404, [Issue(field="model_id", value=repr(model_id), reason=str(error.args[0]))]) from error
    summary = _model_summary(catalog, profile.id)
    return ModelPublic(**summary.model_dump(), source=profile.source, published_num_parameters=profile.published_num_parameters,
                       config=profile.config)


@router.get("/gpus", response_model=GPUsPublic, tags=["catalog"])
def get_gpus(catalog: CatalogDep) -> GPUsPublic:
    """Every GPU profile, smallest memory first."""
    rows = [GPUPublic.from_profile(gpu) for gpu in sorted(catalog.gpus.values(), key=lambda gpu: (gpu.memory_bytes, gpu.id))]
    return GPUsPublic(data=rows, count=len(rows))


def _model_summary(catalog: Catalog, model_id: str) -> ModelSummary:
    profile = catalog.models[model_id]
    resolved = resolve_model(ModelSpec(id=model_id), catalog)
    return ModelSummary(id=model_id, model_type=profile.config.get("model_type"),
                        num_parameters=sum(module.numel for module in resolved.modules))


class _BodyErrors:
    """FastAPI's request errors as ``validation_issues`` reads them: the leading ``body`` dropped, an
    unparsable body said plainly."""

    def __init__(self, errors: Any) -> None:
        self._errors = [self._clean(dict(item)) for item in errors]

    @staticmethod
    def _clean(item: dict[str, Any]) -> dict[str, Any]:
        loc = tuple(item["loc"])
        if item["type"] == "json_invalid":
            return {"type": "json_invalid", "loc": ("body",), "msg": f"not valid JSON: {item.get('ctx', {}).get('error', 'decode error')}",
                    "input": f"at character {loc[-1]}" if len(loc) > 1 else ""}
        if loc == ("body",) and item["type"] == "missing":
            return {"type": "missing", "loc": (), "msg": "a Workload JSON body is required"}
        if item["type"] == "missing":
            item.pop("input", None)
        return item | {"loc": loc[1:] if loc[:1] == ("body",) else loc}

    def errors(self, include_url: bool = False) -> list[dict[str, Any]]:
        return self._errors


async def on_request_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return error_response(422, validation_issues(_BodyErrors(error.errors())))  # type: ignore[arg-type]


async def on_api_error(request: Request, error: APIError) -> JSONResponse:
    return error_response(error.status, error.issues)


async def on_http_error(request: Request, error: StarletteHTTPException) -> Response:
    """Unknown paths and wrong methods: the issue format under /api/v1, plain text elsewhere."""
    headers = getattr(error, "headers", None)
    if not request.url.path.startswith(router.prefix):
        return PlainTextResponse(str(error.detail), status_code=error.status_code, headers=headers)
    issue = Issue(field="", value=repr(request.url.path), reason=str(error.detail))
    return JSONResponse(status_code=error.status_code, content={"detail": [issue.model_dump()]}, headers=headers)


async def on_domain_error(request: Request, error: Exception) -> JSONResponse:
    problem = problem_from(error)
    return error_response(problem.status, problem.issues)


async def on_unexpected_error(request: Request, error: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    reason = "internal error: the request could not be answered"
    if not request.url.path.startswith(router.prefix):
        return PlainTextResponse(reason, status_code=500)
    return error_response(500, [Issue(field="", value="", reason=reason)])


EXCEPTION_HANDLERS: dict[Any, Any] = {
    RequestValidationError: on_request_validation_error,
    StarletteHTTPException: on_http_error,
    APIError: on_api_error,
    UnknownModelError: on_domain_error,
    UnknownGPUError: on_domain_error,
    ArchitectureError: on_domain_error,
    SetupError: on_domain_error,
    HubError: on_domain_error,
    Exception: on_unexpected_error,
}
