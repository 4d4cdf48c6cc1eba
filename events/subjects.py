"""JetStream stream names and subjects.

One subject per conversation in the event stream is what makes single-writer
appends possible: `Nats-Expected-Last-Subject-Sequence` is checked per subject.
"""

from __future__ import annotations

import re

CMD_STREAM = "CHAT_CMD"
EVT_STREAM = "CHAT_EVT"
CMD_PREFIX = "chat.cmd"
EVT_PREFIX = "chat.evt"
CMD_SUBJECTS = f"{CMD_PREFIX}.>"
EVT_SUBJECTS = f"{EVT_PREFIX}.>"

# ids become subject tokens: no dots, wildcards or whitespace
_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def valid_id(value: str) -> bool:
    return bool(_ID.match(value))


def command_subject(conversation_id: str) -> str:
    return f"{CMD_PREFIX}.{conversation_id}"


def event_subject(conversation_id: str) -> str:
    return f"{EVT_PREFIX}.{conversation_id}"
