"""The model catalogue's tables: written from PARLEY_MODELS_FILE at start, read by GET /v1/models.

Configuration, not projection (projections/config.sql): no event makes these
rows, and a rebuild leaves them alone. The wiring hands in plain rows (this
package imports nothing of the actors); the version in force is chosen here by
the same rule the actor prices turns with (DESIGN section 4: status active, the
default first, then the newest release), in SQL.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec


class VersionRow(msgspec.Struct, frozen=True):
    version: str
    status: str
    is_default: bool
    release_date: dt.date | None
    input_price: float
    output_price: float


class ModelRow(msgspec.Struct, frozen=True):
    name: str
    base_url: str | None
    max_output_tokens: int | None
    is_default: bool
    versions: list[VersionRow]


async def store_models(pool: Any, models: list[ModelRow]) -> None:
    """Make the tables hold exactly `models` (one transaction: readers see old or new)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM model_versions")
        await conn.execute("DELETE FROM models")
        await conn.executemany(
            "INSERT INTO models (name, base_url, max_output_tokens, is_default)"
            " VALUES ($1, $2, $3, $4)",
            [(m.name, m.base_url, m.max_output_tokens, m.is_default) for m in models],
        )
        await conn.executemany(
            "INSERT INTO model_versions (model, version, status, is_default, release_date,"
            " input_price, output_price) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [
                (
                    m.name,
                    v.version,
                    v.status,
                    v.is_default,
                    v.release_date,
                    v.input_price,
                    v.output_price,
                )
                for m in models
                for v in m.versions
            ],
        )


class ModelListing(msgspec.Struct, frozen=True):
    """A model as GET /v1/models shows it: its version in force and that version's prices."""

    name: str
    is_default: bool
    max_output_tokens: int | None
    active_version: str | None
    input_price: float | None  # credits per million tokens
    output_price: float | None
    versions: list[VersionRow]


async def list_models(pool: Any) -> list[ModelListing]:
    models = await pool.fetch(
        "SELECT name, max_output_tokens, is_default FROM models ORDER BY name"
    )
    versions = await pool.fetch(
        "SELECT model, version, status, is_default, release_date, input_price, output_price"
        " FROM model_versions"
        " ORDER BY model, (status = 'active') DESC, is_default DESC,"
        " release_date DESC NULLS LAST, version DESC"
    )
    by_model: dict[str, list[VersionRow]] = {}
    for row in versions:
        by_model.setdefault(row["model"], []).append(
            VersionRow(**{k: v for k, v in dict(row).items() if k != "model"})
        )
    out = []
    for model in models:
        own = by_model.get(model["name"], [])
        active = next((v for v in own if v.status == "active"), None)
        out.append(
            ModelListing(
                name=model["name"],
                is_default=model["is_default"],
                max_output_tokens=model["max_output_tokens"],
                active_version=active.version if active else None,
                input_price=active.input_price if active else None,
                output_price=active.output_price if active else None,
                versions=own,
            )
        )
    return out
