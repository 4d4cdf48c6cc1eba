"""`parley chat`'s way to the edge: where it is, which token, and the routes it calls.

The edge: --url, else PARLEY_URL, else the `parley dev` running on the data
folder (its run.json). The token: --token, else PARLEY_TOKEN, else one minted
as `parley token` would. Nothing here draws or reads the terminal.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
import msgspec

from api.auth import mint
from events.subjects import valid_id
from parley.chat_view import MessageRow
from parley.commands import CliError, running_dev, token_secret
from parley.config import Settings

REQUEST_TIMEOUT_S = 30.0
# the header every answer of the edge names its request in (api/request_ids.py)
REQUEST_ID_HEADER = "X-Request-Id"


class Endpoint(msgspec.Struct, frozen=True):
    url: str
    token: str


class RequestFailed(Exception):
    """The edge answered with an error (`{"error": {"code", "message"}}`), for the request
    it named in `X-Request-Id`: what the user is shown names it (`reported`), so that a
    report of the error leads to the edge's log lines for it."""

    def __init__(self, status: int, code: str, message: str, request_id: str = "") -> None:
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        super().__init__(self.reported)

    @property
    def reported(self) -> str:
        """The message, and the request's id when the edge gave one."""
        return f"{self.message} (request id {self.request_id})" if self.request_id else self.message


def resolve_endpoint(
    settings: Settings, *, url: str | None, token: str | None, user: str
) -> Endpoint:
    """The edge: --url, else PARLEY_URL, else the `parley dev` running on the data folder.
    The token: --token, else PARLEY_TOKEN, else one minted for `user` as `parley token` would."""
    base = url or settings.url
    if base is None:
        running = running_dev(settings.data_dir)
        if running is None:
            raise CliError(
                f"no edge to talk to: set PARLEY_URL (or pass --url), or start `make run` "
                f"(`parley dev` on {settings.data_dir}/, or pass its folder with --data)"
            )
        base = running.edge_url
    bearer = token or settings.token
    if bearer is None:
        if not valid_id(user):
            raise CliError("--user must be 1-128 characters of A-Z a-z 0-9 _ -")
        try:
            bearer = mint(token_secret(settings), user)
        except CliError as err:
            raise CliError(f"{err}; or give a token with --token or PARLEY_TOKEN") from err
    return Endpoint(url=base.rstrip("/"), token=bearer)


class Api:
    """The routes the client uses, as the README documents them."""

    def __init__(self, http: aiohttp.ClientSession, endpoint: Endpoint) -> None:
        self.http = http
        self.base = endpoint.url

    def _url(self, path: str) -> str:
        return self.base + path

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        async with self.http.request(
            method,
            self._url(path),
            json=body,
            headers={"Accept": "application/json"},
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        ) as response:
            if response.status >= 400:
                raise await failure(response)
            return await response.json()

    def post_message(
        self, conversation_id: str, body: dict[str, Any]
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        return self.http.post(
            self._url(f"/v1/conversations/{conversation_id}/messages"),
            json=body,
            headers={"Accept": "text/event-stream"},
        )

    def events(
        self, conversation_id: str, last_id: str | None
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        headers = {"Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        return self.http.get(
            self._url(f"/v1/conversations/{conversation_id}/events"), headers=headers
        )


async def failure(response: aiohttp.ClientResponse) -> RequestFailed:
    request_id = response.headers.get(REQUEST_ID_HEADER, "")
    try:
        error = (await response.json(content_type=None))["error"]
        return RequestFailed(response.status, str(error["code"]), str(error["message"]), request_id)
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        return RequestFailed(response.status, "http_error", f"HTTP {response.status}", request_id)


class ConversationJson(msgspec.Struct):
    id: str
    title: str = ""
    active_turn: dict[str, Any] | None = None


class MessagesJson(msgspec.Struct):
    messages: list[MessageRow]
