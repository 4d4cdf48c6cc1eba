"""Who may see which conversation: the caller's own, and nothing else (404, no existence leak)."""

from __future__ import annotations

from aiohttp import web

from api.app import HEADERS, LOG, claims_of
from api.errors import not_found
from events.subjects import valid_id
from events.vocabulary import ConversationCreated


async def owned_conversation(request: web.Request, conversation_id: str) -> ConversationCreated:
    """The conversation's header if the caller may see it; 404 otherwise (no existence leak)."""
    if not valid_id(conversation_id):
        raise not_found("conversation")
    cache = request.app[HEADERS]
    header = cache.get(conversation_id)
    if header is None:
        first = await request.app[LOG].first(conversation_id)
        if first is not None and isinstance(first.event, ConversationCreated):
            header = first.event
            cache.put(header)
    if header is None or header.user_id != claims_of(request).sub:
        raise not_found("conversation")
    return header
