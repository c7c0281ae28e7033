"""The catalog: model and GPU profiles loaded from ``profiles/`` and validated.

A model profile keeps a Hugging Face ``config.json`` verbatim under ``config``; a GPU profile
records the memory the driver reports. The catalog is loaded once at the edge (CLI, app start-up)
and passed into the estimator; the estimator never reads files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


class CatalogError(ValueError):
    """A profile file is missing, malformed or inconsistent."""


class UnknownModelError(LookupError):
    """A model id that is neither in the catalog nor resolvable."""


class UnknownGPUError(LookupError):
    """A GPU id or alias that is not in the catalog."""


class ModelProfile(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    id: str = Field(min_length=3)
    source: str
    config: dict[str, Any]
    published_num_parameters: int | None = None
    published_num_parameters_source: str | None = None


class GPUProfile(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    id: str
    name: str
    vendor: str
    aliases: list[str] = []
    memory_bytes: int = Field(gt=0)
    memory_bytes_source: str | None = None
    architecture: str
    compute_capability: str | None = None
    bf16: bool
    tf32: bool = False
    fp8: bool = False
    flash_attention_2: bool
    memory_bandwidth_gb_s: float | None = None
    fp16_tflops: float | None = None
    bf16_tflops: float | None = None
    source: str

    @property
    def short_name(self) -> str:
        """``T4`` for ``NVIDIA T4 16 GB``: the name people say."""
        return self.aliases[0] if self.aliases else self.name


class Catalog(BaseModel):
    model_config = ConfigDict(frozen=True)

    models: dict[str, ModelProfile]
    gpus: dict[str, GPUProfile]
    calibration: dict[str, Any] = {}

    def model(self, model_id: str) -> ModelProfile:
        """The profile of ``model_id`` (a Hugging Face id; case-insensitive)."""
        found = self._find_model(model_id)
        if found is None:
            raise UnknownModelError(
                f"unknown model {model_id!r}: not in the catalog ({len(self.models)} models; "
                "`vramplan models` lists them); pass model.config with its config.json instead"
            )
        return found

    def has_model(self, model_id: str) -> bool:
        """Whether ``model_id`` is in the catalog (case-insensitive, as ``model``)."""
        return self._find_model(model_id) is not None

    def _find_model(self, model_id: str) -> ModelProfile | None:
        return self.models.get(model_id) or _find_casefold(self.models, model_id)

    def gpu(self, gpu: str) -> GPUProfile:
        """The profile of a GPU id (``nvidia-t4-16gb``) or alias (``T4``, ``A100-80GB``, ``4090``)."""
        key = gpu.strip().lower()
        if key in self.gpus:
            return self.gpus[key]
        for profile in self.gpus.values():
            if key in (alias.lower() for alias in profile.aliases):
                return profile
        raise UnknownGPUError(
            f"unknown GPU {gpu!r}; known ids: {', '.join(sorted(self.gpus))} (aliases such as T4, A100-80GB, 4090 work too)"
        )


def _find_casefold(models: dict[str, ModelProfile], model_id: str) -> ModelProfile | None:
    wanted = model_id.casefold()
    for key, profile in models.items():
        if key.casefold() == wanted:
            return profile
    return None


def profile_filename(model_id: str) -> str:
    """``meta-llama/Llama-2-7b-hf`` -> ``meta-llama--Llama-2-7b-hf.json``."""
    return model_id.replace("/", "--") + ".json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CatalogError(f"{path}: {error}") from error
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: expected a JSON object")
    return data


P = TypeVar("P", ModelProfile, GPUProfile)


def _load_profiles(folder: Path, kind: type[P], file_name: Callable[[str], str]) -> dict[str, P]:
    """Every ``*.json`` under ``folder`` validated as ``kind``, keyed by id; the id must name the file."""
    profiles: dict[str, P] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            profile = kind.model_validate(_read_json(path))
        except ValidationError as error:
            raise CatalogError(f"{path}: {error}") from error
        if file_name(profile.id) != path.name:
            raise CatalogError(f"{path}: id {profile.id!r} does not match the file name")
        profiles[profile.id] = profile
    return profiles


def _load_gpus(folder: Path) -> dict[str, GPUProfile]:
    gpus = _load_profiles(folder, GPUProfile, lambda gpu_id: gpu_id + ".json")
    seen_aliases: dict[str, str] = {}
    for profile in gpus.values():
        for alias in profile.aliases:
            other = seen_aliases.setdefault(alias.lower(), profile.id)
            if other != profile.id:
                raise CatalogError(f"{folder / (profile.id + '.json')}: alias {alias!r} is also used by {other}")
    return gpus


def _load_calibration(folder: Path) -> dict[str, Any]:
    return {path.stem: _read_json(path) for path in sorted(folder.glob("*.json"))}


@cache
def load_catalog(root: Path = PROFILES_DIR) -> Catalog:
    """Read and validate every profile under ``root`` (models/, gpus/, calibration/)."""
    return Catalog(
        models=_load_profiles(root / "models", ModelProfile, profile_filename),
        gpus=_load_gpus(root / "gpus"),
        calibration=_load_calibration(root / "calibration"),
    )
