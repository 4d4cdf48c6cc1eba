"""A project, folded from its subject (`chat.evt.project.<id>`): its name and members.

Pure. The edge folds it to decide who may see a project's conversations; the
projection folds the same events into rows.
"""

from __future__ import annotations

import msgspec

from events.codec import Unreadable
from events.vocabulary import AnyEvent, MemberAdded, ProjectCreated


class ProjectState(msgspec.Struct, frozen=True):
    project_id: str
    exists: bool = False
    name: str = ""
    created_by: str = ""
    members: frozenset[str] = frozenset()


def evolve_project(state: ProjectState, event: AnyEvent | Unreadable) -> ProjectState:
    match event:
        case ProjectCreated():
            if state.exists:
                return state
            return msgspec.structs.replace(
                state,
                exists=True,
                name=event.name,
                created_by=event.created_by,
                members=state.members | {event.created_by},
            )
        case MemberAdded():
            if not state.exists:
                return state
            return msgspec.structs.replace(state, members=state.members | {event.user_id})
        case _:
            return state
