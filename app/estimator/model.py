"""From a Workload's model block to an architecture and its module list (or a bare count)."""

from __future__ import annotations

import json
from functools import lru_cache

from pydantic import BaseModel, ConfigDict

from app.catalog import Catalog
from app.estimator.architecture import Architecture, read_architecture
from app.estimator.params import Module, ModuleKind, list_modules
from app.workload import ModelSpec, Software


class ResolvedModel(BaseModel):
    """An architecture with its modules, or (for a bare parameter count) one anonymous module."""

    model_config = ConfigDict(frozen=True)

    name: str
    arch: Architecture | None
    modules: list[Module]


def resolve_model(spec: ModelSpec, catalog: Catalog, software: Software | None = None) -> ResolvedModel:
    """Resolve ``spec``: a catalog id, a pasted config, or ``num_parameters`` (states only)."""
    if spec.num_parameters is not None:
        module = Module(name="parameters", kind=ModuleKind.linear, weight_numel=spec.num_parameters, per_layer=False)
        return ResolvedModel(name=f"{spec.num_parameters:,} parameters", arch=None, modules=[module])
    if spec.id is not None:
        profile = catalog.model(spec.id)
        config, name = profile.config, profile.id
    else:
        config = spec.config or {}
        name = str(config.get("_name_or_path") or config.get("model_type") or "pasted config")
    return _resolve_config(name, json.dumps(config, sort_keys=True), software.transformers if software else None)


@lru_cache(maxsize=256)
def _resolve_config(name: str, config_json: str, transformers_version: str | None) -> ResolvedModel:
    """Architecture and modules of a config, memoized: the planner estimates one model many times."""
    config = json.loads(config_json)
    arch = read_architecture(config, transformers_version)
    return ResolvedModel(name=name, arch=arch, modules=list_modules(arch, config))


resolve_config_cache_clear = _resolve_config.cache_clear
