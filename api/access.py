"""Who may see what: a user's own conversations, and those of the projects they belong to.

Anything else is a 404, never a 403: whether a conversation or project exists
is not told to someone who may not see it. Membership is read from the
project's own subject in the log (the truth, not a projection that may lag);
a cached fold is refreshed whenever it would refuse someone, so a member just
added is let in at once.
"""

from __future__ import annotations

from aiohttp import web

from api.context import HEADERS, LOG, PROJECTS, claims_of
from api.errors import ApiError, not_found
from events.projects import ProjectState
from events.subjects import valid_id
from events.vocabulary import ConversationCreated, ConversationDeleted


async def project_of_member(request: web.Request, project_id: str) -> ProjectState:
    """The project if the caller is a member; 404 otherwise."""
    if not valid_id(project_id):
        raise not_found("project")
    cache, user = request.app[PROJECTS], claims_of(request).sub
    project = await cache.get(request.app[LOG], project_id)
    if user not in project.members:
        project = await cache.get(request.app[LOG], project_id, fresh=True)
    if not project.exists or user not in project.members:
        raise not_found("project")
    return project


async def _header_in_log(request: web.Request, conversation_id: str) -> ConversationCreated | None:
    """The conversation's header as the log holds it; None when the log has none, or
    when the conversation was deleted: its tombstone is its last entry (before the
    purge, or after it, when it is the only one). A cached header is dropped when the
    deletion is announced (`HeaderCache.forget`); read here, it is checked again."""
    log = request.app[LOG]
    first = await log.first(conversation_id)
    if first is None or not isinstance(first.event, ConversationCreated):
        return None
    last = await log.last(conversation_id)
    if last is not None and isinstance(last.event, ConversationDeleted):
        request.app[HEADERS].forget(conversation_id)
        return None
    return first.event


async def owned_conversation(request: web.Request, conversation_id: str) -> ConversationCreated:
    """The conversation's header if the caller may see it (theirs, or their project's)."""
    if not valid_id(conversation_id):
        raise not_found("conversation")
    cache = request.app[HEADERS]
    if cache.gone(conversation_id):
        raise not_found("conversation")
    header = cache.get(conversation_id)
    if header is None:
        header = await _header_in_log(request, conversation_id)
        if header is not None:
            cache.put(header)
    if header is None:
        raise not_found("conversation")
    if header.user_id == claims_of(request).sub:
        return header
    if header.project_id is not None:
        try:
            await project_of_member(request, header.project_id)
        except ApiError:
            raise not_found("conversation") from None
        return header
    raise not_found("conversation")
