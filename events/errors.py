"""The error hierarchy of the event log."""

from __future__ import annotations

import re
from pathlib import Path


class EventLogError(Exception):
    """Root of everything the event log raises."""


class EventLogConflict(EventLogError):
    """A stale writer tried to append: the subject moved past the sequence it expected."""

    def __init__(self, conversation_id: str, expected: int, detail: str = "") -> None:
        super().__init__(
            f"conversation {conversation_id}: append expected last sequence {expected}"
            + (f" ({detail})" if detail else "")
        )
        self.conversation_id = conversation_id
        self.expected = expected


class PositionGone(EventLogError):
    """The requested position is no longer in the log (retention removed it)."""

    def __init__(self, requested: int, first_available: int) -> None:
        super().__init__(
            f"position {requested} is no longer in the log; "
            f"the oldest kept event is {first_available}"
        )
        self.requested = requested
        self.first_available = first_available


class EventLogUnavailable(EventLogError):
    """The broker did not answer in time."""


class StreamMisconfigured(EventLogError):
    """An existing stream (or bucket) cannot work for parley as it is configured.

    Raised at start instead of changing what an operator set: the message names
    the stream, the setting, what it is and what parley needs.
    """


def describe(err: BaseException) -> str:
    """An error as a log line should show it: its type and its message.

    `repr` is not enough: nats.py's JetStream errors keep their code and
    description out of it (`BadRequestError()`), which is what an operator needs.
    """
    name = type(err).__name__
    text = str(err)
    if not text:
        return name
    return text if name in text else f"{name}: {text}"


def without_userinfo(text: str, url: str) -> str:
    """`text` (a client's error about `url`) with every piece of the URL's user and
    password masked. A password holding `/`, `#` or `?` that was not percent-encoded
    ends the URL's host part early: the client then reads part of it as the port
    ("Port could not be cast to integer value as 'Zk3'") and says so."""
    userinfo = url.split("://", 1)[-1].rpartition("@")[0]
    for piece in sorted(re.split(r"[:/#?]", userinfo), key=len, reverse=True):
        if piece:
            text = text.replace(piece, "***")
    return text


class SettingFileUnreadable(Exception):
    """A file a setting names cannot be read; the message names the setting and why."""


def read_setting_file(setting: str, path: str) -> bytes:
    """The bytes of the file `setting` names (`path`), read at start to check it.
    Raises SettingFileUnreadable with one line that never quotes the content."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SettingFileUnreadable(f"{setting}: {path} does not exist") from None
    except OSError as err:
        raise SettingFileUnreadable(
            f"{setting}: {path} cannot be read ({err.strerror or err})"
        ) from None
