"""Every projection parley runs, by name: what the projector role starts, what
the schema holds and what `parley projections rebuild --projection NAME` knows.

A new projection is a `Projection` (projections/registry.py) with its handlers
and DDL file, added to `PROJECTIONS` here. Nothing else belongs in this module.
"""

from __future__ import annotations

from projections.billing import BILLING
from projections.handlers import READ_MODELS
from projections.registry import Projection

PROJECTIONS: dict[str, Projection] = {p.name: p for p in (READ_MODELS, BILLING)}
