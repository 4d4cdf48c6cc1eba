"""A deployment's tool module with a tool no model API accepts the name of (tests only)."""

from __future__ import annotations

from actors.tools import define_tool


def search(query: str) -> str:
    """Search."""
    return query


BAD_NAME = [define_tool(search, name="zz search")]
