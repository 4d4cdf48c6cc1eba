"""The model catalogue and the pure rule that picks the price in force.

Parsed by the wiring from the TOML file named by PARLEY_MODELS_FILE (DESIGN
section 4); the demo model has a built-in entry. Nothing here reads files or
the environment.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Annotated, Literal

import msgspec

from actors.decide import ModelChoice
from events.vocabulary import Prices

DEFAULT_TEMPERATURE = 0.7
MAX_TOOL_ROUNDS = 99


# A misspelt key in the models file is an error, not a price of 0 (forbid_unknown_fields).
Price = Annotated[float, msgspec.Meta(ge=0)]  # credits per million tokens


class ModelVersion(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: Annotated[str, msgspec.Meta(min_length=1)]
    status: Literal["active", "deprecated"] = "active"
    is_default: bool = False
    release_date: dt.date | None = None
    input_price: Price = 0.0
    output_price: Price = 0.0


class ModelSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1)]  # what clients send as `model`
    base_url: str | None = None
    api_key_env: str | None = None
    api_key: str | None = None  # resolved by the wiring from api_key_env
    upstream_name: str | None = None  # the name sent to the endpoint, if it differs
    max_output_tokens: Annotated[int, msgspec.Meta(gt=0)] | None = None
    # the model's context window in tokens (prompt and answer together): the history
    # sent is the newest part that fits (actors.content.fit_history); None: not known,
    # all of it is sent, and trimmed only once the provider refuses it as too long
    context_window: Annotated[int, msgspec.Meta(gt=0)] | None = None
    # What the endpoint accepts, for servers that refuse OpenAI's defaults: the
    # temperature sent (unset: DEFAULT_TEMPERATURE; OpenAI's reasoning models take
    # only 1), the field max_output_tokens goes in (OpenAI's reasoning models refuse
    # `max_tokens`), whether `stream_options.include_usage` is sent (Mistral
    # refuses the field, and reports usage without it), and the `content` of an
    # assistant message with tool calls and no text: null, as OpenAI's SDKs send
    # (gateways onto Anthropic or Bedrock refuse ""), or "" (xAI refuses null).
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    include_usage: bool = True
    tool_call_content: Literal["null", "empty"] = "null"
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
    return sorted(active, key=_precedence, reverse=True)[0]


def _precedence(version: ModelVersion) -> tuple[bool, dt.date]:
    return (version.is_default, version.release_date or dt.date.min)


def catalogue_problems(models: list[ModelSpec]) -> list[str]:
    """What makes a catalogue ambiguous or unusable: a name twice, no single version in
    force, or a price that is not a number (TOML's `inf`).

    Two active versions that tie on the rule above would leave the price in
    force to the order of the file's lines, and GET /v1/models could show the
    other one; the file has to say.
    """
    problems, names = [], set()
    for spec in models:
        if spec.name in names:
            problems.append(f"model {spec.name!r} is listed twice")
        names.add(spec.name)
        window, answer = spec.context_window, spec.max_output_tokens
        if window is not None and answer is not None and answer >= window:
            problems.append(
                f"model {spec.name!r}: max_output_tokens {answer} leaves no room for any"
                f" message in its context_window {window}"
            )
        versions = [v.version for v in spec.versions]
        for twice in sorted({v for v in versions if versions.count(v) > 1}):
            problems.append(f"model {spec.name!r} lists version {twice!r} twice")
        # `inf` passes `ge=0`, but no cost can be computed from it, and a `started`
        # recording it would be written to the log as null: an entry no reader decodes.
        for v in spec.versions:
            for field, price in (("input_price", v.input_price), ("output_price", v.output_price)):
                if not math.isfinite(price):
                    problems.append(
                        f"model {spec.name!r} version {v.version!r}: {field} {price} is not a price"
                    )
        active = [v for v in spec.versions if v.status == "active"]
        best = max(map(_precedence, active), default=None)
        tied = [v.version for v in active if _precedence(v) == best]
        if len(tied) > 1:
            problems.append(
                f"model {spec.name!r}: versions {', '.join(map(repr, tied))} tie for the one in"
                " force (active, is_default, release_date); mark one is_default or date them"
            )
    return problems


def endpoint_api_key(spec: ModelSpec, default_key: str | None) -> str | None:
    """The key sent with a call to `spec`'s endpoint.

    PARLEY_MODEL_API_KEY belongs to PARLEY_MODEL_BASE_URL: a model with an
    endpoint or a key variable of its own never gets it, so a third party's
    endpoint is never handed the main provider's key.
    """
    if spec.api_key is not None or spec.api_key_env or spec.base_url:
        return spec.api_key
    return default_key


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
        temperature=DEFAULT_TEMPERATURE if spec.temperature is None else spec.temperature,
    )
