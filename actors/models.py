"""The model catalogue and the pure rule that picks the price in force.

Parsed by the wiring from the TOML file named by PARLEY_MODELS_FILE (DESIGN
section 4); the demo model has a built-in entry. Nothing here reads files or
the environment.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

import msgspec

from actors.decide import ModelChoice
from events.vocabulary import Prices

DEFAULT_TEMPERATURE = 0.7
MAX_TOOL_ROUNDS = 99


class ModelVersion(msgspec.Struct, frozen=True):
    version: str
    status: Literal["active", "deprecated"] = "active"
    is_default: bool = False
    release_date: dt.date | None = None
    input_price: float = 0.0  # credits per million tokens
    output_price: float = 0.0


class ModelSpec(msgspec.Struct, frozen=True):
    name: str  # what clients send as `model`
    base_url: str | None = None
    api_key_env: str | None = None
    api_key: str | None = None  # resolved by the wiring from api_key_env
    upstream_name: str | None = None  # the name sent to the endpoint, if it differs
    max_output_tokens: int | None = None
    versions: list[ModelVersion] = []


class ModelCatalog(msgspec.Struct, frozen=True):
    models: list[ModelSpec]
    default_model: str

    def get(self, name: str | None) -> ModelSpec | None:
        wanted = name or self.default_model
        return next((m for m in self.models if m.name == wanted), None)


def active_version(spec: ModelSpec) -> ModelVersion | None:
    """The version in force: status active, the default first, then the newest release."""
    active = [v for v in spec.versions if v.status == "active"]
    if not active:
        return None
    return sorted(
        active,
        key=lambda v: (v.is_default, v.release_date or dt.date.min),
        reverse=True,
    )[0]


def choose_model(spec: ModelSpec) -> ModelChoice:
    version = active_version(spec)
    prices = (
        Prices(input_price=version.input_price, output_price=version.output_price)
        if version
        else Prices()
    )
    return ModelChoice(
        name=spec.name,
        version_id=f"{spec.name}@{version.version}" if version else spec.name,
        prices=prices,
        max_tokens=spec.max_output_tokens,
        temperature=DEFAULT_TEMPERATURE,
    )
