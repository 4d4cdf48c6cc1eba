"""Settings: read from the environment once, here, and passed down as frozen Structs.

No other module reads `os.environ`.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path

import msgspec

from actors.models import ModelCatalog, ModelSpec, ModelVersion, catalogue_problems
from actors.snapshots import SNAPSHOT_EVERY
from actors.webhooks import settings_problem as webhook_settings_problem
from api.config import EdgeLimits, parse_cors_origins
from events.broker import NatsSecurity
from projections.db import check_schema_name

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"
# The demo model's built-in entry: what a new user chats with, priced like a
# mid-size hosted model so that billing has something to count.
DEMO_SPEC = ModelSpec(
    name=DEMO_MODEL,
    versions=[
        ModelVersion(
            version="2026-01",
            status="active",
            is_default=True,
            input_price=3.0,
            output_price=15.0,
        )
    ],
)


MIN_SECRET_CHARS = 32


class ConfigError(Exception):
    """Configuration that cannot work; the message says which variable and why."""


class Settings(msgspec.Struct, frozen=True):
    data_dir: Path
    nats_url: str | None = None
    # PARLEY_NATS_TLS_CA, _TLS_CERT, _TLS_KEY, _CREDS, _NKEY: files (events/broker.py)
    nats_security: NatsSecurity = NatsSecurity()
    database_url: str | None = None
    redis_url: str | None = None
    model_base_url: str | None = None
    model_api_key: str | None = None
    model: str | None = None
    # PARLEY_MODEL_CONTEXT_WINDOW: the context window (tokens) of PARLEY_MODEL's model
    model_context_window: int | None = None
    jwt_secret: str | None = None
    jwt_jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    models_file: str | None = None
    db_schema: str = "parley"
    demo_tokens_per_s: float = 40.0  # how fast the demo model streams in `parley dev`
    # the demo model refuses a prompt over this many tokens, as a provider does (0: never)
    demo_context_window: int = 0
    webhook_url: str | None = None  # turn-end webhooks (PARLEY_WEBHOOK_URL)
    webhook_secret: str | None = None
    tools: tuple[str, ...] = ()  # PARLEY_TOOLS: module:attribute specs of more tools
    shutdown_grace_s: float = 10.0  # how long a stopping worker lets turns finish
    append_window_ms: float = 5.0  # how long streamed text waits to share an append
    append_window_light_ms: float = 1.0  # ... while the worker has CPU to spare
    # a snapshot of a conversation is written to Redis every this many log entries (0: none, nor read)
    snapshot_every: int = SNAPSHOT_EVERY
    limits: EdgeLimits = EdgeLimits()
    log_format: str = "text"  # or "json"
    max_projection_lag: int = 10_000  # /readyz: unready beyond this many events behind (0: never)
    # `parley serve` without the edge role serves GET /metrics on this port (None: not at all)
    metrics_port: int | None = None
    # PARLEY_STREAM_REPLICAS: replicas of the streams and the lease bucket parley creates
    # (1 for one server; 3 on a production cluster). Existing ones are left as they are.
    stream_replicas: int = 1
    # PARLEY_CORS_ORIGINS: origins whose pages may call the edge (api/cors.py)
    cors_origins: frozenset[str] = frozenset()
    # `parley chat`: the edge to talk to and the token to show it (unset: the running `parley dev`)
    url: str | None = None
    token: str | None = None

    @property
    def embedded(self) -> bool:
        """No server configured: the dev stack on the data folder provides them."""
        return not (self.nats_url or self.database_url or self.redis_url)


def settings_from_env(env: Mapping[str, str], data_dir: str | Path | None = None) -> Settings:
    def get(name: str) -> str | None:
        value = env.get(name, "").strip()
        return value or None

    jwt_secret = get("PARLEY_JWT_SECRET")
    if jwt_secret is not None and len(jwt_secret) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"PARLEY_JWT_SECRET must be at least {MIN_SECRET_CHARS} characters "
            "(HS256 with a short secret can be guessed offline from one token)"
        )
    jwks_url, issuer, audience = (
        get("PARLEY_JWT_JWKS_URL"),
        get("PARLEY_JWT_ISSUER"),
        get("PARLEY_JWT_AUDIENCE"),
    )
    if jwks_url is not None and (issuer is None or audience is None):
        raise ConfigError(
            "PARLEY_JWT_JWKS_URL needs PARLEY_JWT_ISSUER and PARLEY_JWT_AUDIENCE too: "
            "a token from the identity provider is accepted only for this issuer and audience"
        )
    if jwks_url is None and (issuer is not None or audience is not None):
        raise ConfigError(
            "PARLEY_JWT_ISSUER and PARLEY_JWT_AUDIENCE apply only with PARLEY_JWT_JWKS_URL"
        )
    webhook_url, webhook_secret = get("PARLEY_WEBHOOK_URL"), get("PARLEY_WEBHOOK_SECRET")
    if (webhook_url is None) != (webhook_secret is None):
        raise ConfigError(
            "PARLEY_WEBHOOK_URL and PARLEY_WEBHOOK_SECRET go together: "
            "every webhook is signed with the secret"
        )
    if webhook_url is not None and webhook_secret is not None:
        problem = webhook_settings_problem(webhook_url, webhook_secret)
        if problem is not None:
            raise ConfigError(problem)
    return Settings(
        data_dir=Path(data_dir or get("PARLEY_DATA") or ".parley"),
        nats_url=get("PARLEY_NATS_URL"),
        nats_security=NatsSecurity(
            tls_ca=get("PARLEY_NATS_TLS_CA"),
            tls_cert=get("PARLEY_NATS_TLS_CERT"),
            tls_key=get("PARLEY_NATS_TLS_KEY"),
            creds=get("PARLEY_NATS_CREDS"),
            nkey=get("PARLEY_NATS_NKEY"),
        ),
        database_url=get("PARLEY_DATABASE_URL"),
        redis_url=get("PARLEY_REDIS_URL"),
        model_base_url=get("PARLEY_MODEL_BASE_URL"),
        model_api_key=get("PARLEY_MODEL_API_KEY"),
        model=get("PARLEY_MODEL"),
        model_context_window=_window(get("PARLEY_MODEL_CONTEXT_WINDOW")),
        jwt_secret=jwt_secret,
        jwt_jwks_url=jwks_url,
        jwt_issuer=issuer,
        jwt_audience=audience,
        models_file=get("PARLEY_MODELS_FILE"),
        db_schema=_schema(get("PARLEY_DB_SCHEMA") or "parley"),
        demo_tokens_per_s=_float(get("PARLEY_DEMO_TOKENS_PER_S"), 40.0, "PARLEY_DEMO_TOKENS_PER_S"),
        demo_context_window=_int(
            get("PARLEY_DEMO_CONTEXT_WINDOW"), 0, "PARLEY_DEMO_CONTEXT_WINDOW"
        ),
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        tools=tuple(
            spec.strip() for spec in (get("PARLEY_TOOLS") or "").split(",") if spec.strip()
        ),
        shutdown_grace_s=_float(get("PARLEY_SHUTDOWN_GRACE_S"), 10.0, "PARLEY_SHUTDOWN_GRACE_S"),
        append_window_ms=_float(get("PARLEY_APPEND_WINDOW_MS"), 5.0, "PARLEY_APPEND_WINDOW_MS"),
        append_window_light_ms=_float(
            get("PARLEY_APPEND_WINDOW_LIGHT_MS"), 1.0, "PARLEY_APPEND_WINDOW_LIGHT_MS"
        ),
        snapshot_every=_int(get("PARLEY_SNAPSHOT_EVERY"), SNAPSHOT_EVERY, "PARLEY_SNAPSHOT_EVERY"),
        limits=_limits(get),
        log_format=_log_format(get("PARLEY_LOG_FORMAT")),
        max_projection_lag=_int(
            get("PARLEY_MAX_PROJECTION_LAG"), 10_000, "PARLEY_MAX_PROJECTION_LAG"
        ),
        metrics_port=_port(get("PARLEY_METRICS_PORT"), "PARLEY_METRICS_PORT"),
        stream_replicas=_replicas(get("PARLEY_STREAM_REPLICAS")),
        cors_origins=_cors_origins(get("PARLEY_CORS_ORIGINS")),
        url=_url(get("PARLEY_URL")),
        token=get("PARLEY_TOKEN"),
    )


# JetStream keeps at most five copies of a stream.
MAX_REPLICAS = 5


def _replicas(raw: str | None) -> int:
    if raw is None:
        return 1
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_REPLICAS:
        raise ConfigError(
            f"PARLEY_STREAM_REPLICAS must be a whole number from 1 to {MAX_REPLICAS}, not {raw!r}"
        )
    return int(raw)


def _cors_origins(raw: str | None) -> frozenset[str]:
    if raw is None:
        return frozenset()
    try:
        return parse_cors_origins(raw)
    except ValueError as err:
        raise ConfigError(f"PARLEY_CORS_ORIGINS: {err}") from err


def _url(raw: str | None) -> str | None:
    if raw is None:
        return None
    if not raw.startswith(("http://", "https://")):
        raise ConfigError(f"PARLEY_URL must be an http:// or https:// URL, not {raw!r}")
    return raw.rstrip("/")


def _limits(get: Callable[[str], str | None]) -> EdgeLimits:
    d = EdgeLimits()
    return EdgeLimits(
        rate_per_s=_float(get("PARLEY_RATE_PER_S"), d.rate_per_s, "PARLEY_RATE_PER_S"),
        # counts: a fraction would be cut to a whole number, and 0.5 to 0, no limit at all
        rate_burst=_int(get("PARLEY_RATE_BURST"), d.rate_burst, "PARLEY_RATE_BURST"),
        max_streams_per_user=_int(
            get("PARLEY_MAX_STREAMS_PER_USER"),
            d.max_streams_per_user,
            "PARLEY_MAX_STREAMS_PER_USER",
        ),
        max_turns_per_user=_int(
            get("PARLEY_MAX_TURNS_PER_USER"), d.max_turns_per_user, "PARLEY_MAX_TURNS_PER_USER"
        ),
        write_timeout_s=_positive(
            _float(get("PARLEY_WRITE_TIMEOUT_S"), d.write_timeout_s, "PARLEY_WRITE_TIMEOUT_S"),
            "PARLEY_WRITE_TIMEOUT_S",
        ),
        body_timeout_s=_positive(
            _float(get("PARLEY_BODY_TIMEOUT_S"), d.body_timeout_s, "PARLEY_BODY_TIMEOUT_S"),
            "PARLEY_BODY_TIMEOUT_S",
        ),
        idle_timeout_s=_positive(
            _float(get("PARLEY_IDLE_TIMEOUT_S"), d.idle_timeout_s, "PARLEY_IDLE_TIMEOUT_S"),
            "PARLEY_IDLE_TIMEOUT_S",
        ),
    )


def _window(raw: str | None) -> int | None:
    if raw is None:
        return None
    value = _int(raw, 0, "PARLEY_MODEL_CONTEXT_WINDOW")
    if value == 0:
        raise ConfigError("PARLEY_MODEL_CONTEXT_WINDOW must be a number of tokens above 0")
    return value


def _positive(value: float, name: str) -> float:
    if value <= 0:
        raise ConfigError(f"{name} must be more than 0")
    return value


def _port(raw: str | None, name: str) -> int | None:
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or not 0 <= int(raw) <= 65535:
        raise ConfigError(f"{name} must be a port number (0-65535), not {raw!r}")
    return int(raw)


def _log_format(raw: str | None) -> str:
    value = (raw or "text").lower()
    if value not in ("text", "json"):
        raise ConfigError(f"PARLEY_LOG_FORMAT must be text or json, not {raw!r}")
    return value


def _schema(name: str) -> str:
    try:
        return check_schema_name(name)
    except ValueError as err:
        raise ConfigError(
            f"PARLEY_DB_SCHEMA: {err} (lower-case letters, digits and _, not first a digit)"
        ) from err


def _float(raw: str | None, default: float, name: str) -> float:
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError as err:
        raise ConfigError(f"{name} must be a number, not {raw!r}") from err
    if not math.isfinite(value):
        # float() takes "nan" and "inf": NaN passes every comparison unnoticed
        raise ConfigError(f"{name} must be a number, not {raw!r}")
    if value < 0:
        raise ConfigError(f"{name} must not be negative")
    return value


def _int(raw: str | None, default: int, name: str) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as err:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}") from err
    if value < 0:
        raise ConfigError(f"{name} must not be negative")
    return value


def load_settings(data_dir: str | Path | None = None) -> Settings:
    return settings_from_env(os.environ, data_dir)


def load_catalog(
    settings: Settings, env: Mapping[str, str] | None = None, *, builtin_demo: bool = True
) -> ModelCatalog:
    """The demo entry, the models file's entries (which may replace it), and PARLEY_MODEL.

    `builtin_demo` false (`parley serve`): the demo entry only where it is the default
    model. A deployment whose models file and PARLEY_MODEL name real models must not
    offer clients a `demo` that its endpoint does not serve, nor need
    PARLEY_MODEL_BASE_URL for it.
    """
    env = os.environ if env is None else env
    specs: dict[str, ModelSpec] = {DEMO_MODEL: DEMO_SPEC} if builtin_demo else {}
    if settings.models_file:
        for spec in parse_models_file(Path(settings.models_file)):
            if spec.api_key_env:
                key = env.get(spec.api_key_env) or None
                if key is None:
                    log.warning(
                        "model %r: %s is not set; its calls go without a key",
                        spec.name,
                        spec.api_key_env,
                    )
                spec = msgspec.structs.replace(spec, api_key=key)
            specs[spec.name] = spec
    default = settings.model or DEMO_MODEL
    if default == DEMO_MODEL and default not in specs:
        specs[default] = DEMO_SPEC
    if default not in specs:
        # A model named only by PARLEY_MODEL: served by PARLEY_MODEL_BASE_URL. No
        # price is known, so it has no version: a project's turn on it fails as
        # `model_not_priced` rather than running free.
        specs[default] = ModelSpec(name=default)
    window = settings.model_context_window
    if window is not None:
        spec = specs[default]
        if spec.context_window not in (None, window):
            raise ConfigError(
                f"PARLEY_MODEL_CONTEXT_WINDOW is {window}, and the models file gives model"
                f" {default!r} a context_window of {spec.context_window}: set one of them"
            )
        spec = msgspec.structs.replace(spec, context_window=window)
        if problems := catalogue_problems([spec]):
            raise ConfigError(f"PARLEY_MODEL_CONTEXT_WINDOW: {'; '.join(problems)}")
        specs[default] = spec
    return ModelCatalog(models=list(specs.values()), default_model=default)


class _ModelsFile(msgspec.Struct, forbid_unknown_fields=True):
    models: list[ModelSpec] = []


def parse_models_file(path: Path) -> list[ModelSpec]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        models = msgspec.convert(raw, type=_ModelsFile).models
    except FileNotFoundError as err:
        raise ConfigError(f"PARLEY_MODELS_FILE {path} does not exist") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"PARLEY_MODELS_FILE {path} cannot be read: {err}") from err
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as err:
        raise ConfigError(f"PARLEY_MODELS_FILE {path}: {err}") from err
    if problems := catalogue_problems(models):
        raise ConfigError(f"PARLEY_MODELS_FILE {path}: {'; '.join(problems)}")
    return models


def dev_jwt_secret(settings: Settings) -> str:
    """For `parley dev`: PARLEY_JWT_SECRET, else the data folder's secret (created on first use)."""
    if settings.jwt_secret:
        return settings.jwt_secret
    path = settings.data_dir / SECRET_FILE
    if not path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first; use theirs
        else:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


def data_folder_secret(data_dir: Path) -> str | None:
    """The secret `parley dev` keeps in `data_dir`, if there is one. Never creates it."""
    try:
        return (data_dir / SECRET_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


SECRET_FILE = "jwt_secret"
