"""What every command shares: the error it reports to the user, and the record
a running `parley dev` leaves in its data folder for the other commands
(where its edge listens, which secret its tokens are signed with)."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from parley.config import Settings, data_folder_secret

RUN_FILE = "run.json"


class CliError(Exception):
    """A message for the user; the command exits with status 2."""


class RunInfo(msgspec.Struct, frozen=True):
    """What `parley dev` records in the data folder for the other commands."""

    edge_url: str
    model_base_url: str
    pid: int


def token_secret(settings: Settings) -> str:
    """The secret the running servers check tokens with: PARLEY_JWT_SECRET, else that of
    the `parley dev` running on the data folder. Never a new one: a token signed with a
    secret no server knows would only be refused later, far from the cause."""
    if settings.jwt_secret:
        return settings.jwt_secret
    secret = data_folder_secret(settings.data_dir) if running_dev(settings.data_dir) else None
    if secret is None:
        raise CliError(
            f"no PARLEY_JWT_SECRET set and no `parley dev` running on {settings.data_dir}/: "
            "start `make run` first (or pass the folder it uses with --data), "
            "or set PARLEY_JWT_SECRET to the secret your servers use"
        )
    return secret


def running_dev(data_dir: Path) -> RunInfo | None:
    """What the `parley dev` running on `data_dir` recorded, if one runs there now."""
    try:
        info = msgspec.json.decode((data_dir / RUN_FILE).read_bytes(), type=RunInfo)
    except (FileNotFoundError, msgspec.DecodeError):
        return None
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return None  # a dev that was killed left its record behind
    except PermissionError:
        pass  # alive, under another account
    return info
