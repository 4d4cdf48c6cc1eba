"""JetStream stream names and subjects.

One subject per conversation in the event stream is what makes single-writer
appends possible: `Nats-Expected-Last-Subject-Sequence` is checked per subject.

Commands travel on `chat.cmd.<partition>.<conversation>`: a conversation always
falls in the same partition (a stable hash of its id), and one worker at a time
owns a partition, so every command of a conversation reaches the one actor that
holds it, in order (actors/partitions.py).
"""

from __future__ import annotations

import re
import zlib

CMD_STREAM = "CHAT_CMD"
EVT_STREAM = "CHAT_EVT"
CMD_PREFIX = "chat.cmd"
EVT_PREFIX = "chat.evt"
CMD_SUBJECTS = f"{CMD_PREFIX}.>"
EVT_SUBJECTS = f"{EVT_PREFIX}.>"
# CHAT_EVT republishes every entry it stores here, plain NATS with its position in
# headers: what an edge follows live (events.follow.LiveFollower)
LIVE_PREFIX = "chat.live"
LIVE_SUBJECTS = f"{LIVE_PREFIX}.>"

# A deleted conversation's id is announced here (plain NATS) once its log is erased:
# every edge drops what it cached of it (api.context.HeaderCache)
GONE_PREFIX = "chat.gone"
GONE_SUBJECTS = f"{GONE_PREFIX}.*"

# ids become subject tokens: no dots, wildcards or whitespace
_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# the same, as a JSON Schema pattern (anchored: a schema's pattern matches anywhere)
ID_PATTERN = f"^{_ID.pattern}$"


def valid_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


PARTITIONS = 16


def partition_of(conversation_id: str, partitions: int = PARTITIONS) -> int:
    """Stable across processes and versions (crc32, not Python's salted hash)."""
    return zlib.crc32(conversation_id.encode()) % partitions


def command_subject(conversation_id: str, partitions: int = PARTITIONS) -> str:
    return f"{CMD_PREFIX}.{partition_of(conversation_id, partitions)}.{conversation_id}"


def partition_subjects(partition: int) -> str:
    return f"{CMD_PREFIX}.{partition}.*"


def event_subject(conversation_id: str) -> str:
    return f"{EVT_PREFIX}.{conversation_id}"


def conversation_of(subject: str) -> str | None:
    """The conversation whose log `subject` is (`event_subject`), if it is one's."""
    prefix, _, rest = subject.partition(".evt.")
    if f"{prefix}.evt" != EVT_PREFIX or not valid_id(rest):
        return None  # not the event stream's, or an account's or a project's subject
    return rest


def live_subject(conversation_id: str) -> str:
    """Where CHAT_EVT republishes the conversation's entries once stored."""
    return f"{LIVE_PREFIX}.{conversation_id}"


def gone_subject(conversation_id: str) -> str:
    """Where a deleted conversation is announced to the edges (`GONE_PREFIX`)."""
    return f"{GONE_PREFIX}.{conversation_id}"


def account_subject(account: str) -> str:
    """`user:<id>` or `project:<id>` -> chat.evt.account.<kind>.<id>."""
    kind, _, owner = account.partition(":")
    return f"{EVT_PREFIX}.account.{kind}.{owner}"


def account_of(subject: str) -> str | None:
    """`user:<id>` or `project:<id>` for an account's subject: `account_subject` undone."""
    prefix = f"{EVT_PREFIX}.account."
    if not subject.startswith(prefix):
        return None
    kind, _, owner = subject[len(prefix) :].partition(".")
    return f"{kind}:{owner}" if kind and owner else None


def project_subject(project_id: str) -> str:
    return f"{EVT_PREFIX}.project.{project_id}"
