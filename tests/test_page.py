"""The web page (api/static/index.html) in a real browser, against the live stack.

Debian's chromium, driven by Playwright (never a browser build Playwright would
download): one browser for the session, a fresh context and page per test. The
page talks to the session's edge, workers and projections, nothing mocked; the
demo model streams at 400 tokens/s, so `[[tokens=N]]` answers take N/400 s.
Waits are Playwright's (on selectors, text, attributes), never fixed sleeps.
Screenshots of the main states go to test-artefacts/page/ (gitignored).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Dialog,
    Locator,
    Page,
    Request,
    Response,
    expect,
)

from api.auth import mint
from events.log import EventLog
from parley.services import Services
from tests.conftest import SECRET, Projected, token_for
from tests.sse import SseClient

ARTEFACTS = Path(__file__).resolve().parent.parent / "test-artefacts" / "page"
# Playwright's waits: long enough for a loaded 2-core machine, short enough to fail fast.
expect.set_options(timeout=20_000)


def counted(n: int) -> str:
    """The answer of `[[tokens=n]]`: every token once, in order."""
    return "".join(f"{i} " for i in range(n))


class Tab:
    """A page plus the JavaScript errors it raised (a test fails on any)."""

    def __init__(self, page: Page, name: str) -> None:
        self.page = page
        self.name = name
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        # what the page's Content-Security-Policy refused (its own script or style)
        page.on("console", self._refused)

    def _refused(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            self.errors.append(message.text)

    async def shot(self, state: str) -> None:
        await self.page.screenshot(path=str(ARTEFACTS / f"{self.name}--{state}.png"))


class Browsing:
    """One browser context (one localStorage) per test, with as many tabs as it opens."""

    def __init__(self, context: BrowserContext, name: str) -> None:
        self.context = context
        self.name = name
        self.tabs: list[Tab] = []

    async def tab(self) -> Tab:
        tab = Tab(await self.context.new_page(), f"{self.name}-{len(self.tabs) + 1}")
        self.tabs.append(tab)
        return tab


@pytest.fixture
async def browsing(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Browsing]:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    name = re.sub(r"^test_", "", request.node.name)
    session = Browsing(context, name)
    try:
        yield session
        # Every turn a tab saw from its start streamed exactly what was stored, each
        # event once (counted by the page since its last load).
        for tab in session.tabs:
            seen = await stats(tab.page)
            assert seen["duplicates"] == 0 and seen["mismatches"] == 0, (tab.name, seen)
    finally:
        await context.close()
    errors = [f"{tab.name}: {error}" for tab in session.tabs for error in tab.errors]
    assert not errors, f"the page raised JavaScript errors: {errors}"


async def open_signed_in(tab: Tab, base: str, token: str, conversation: str | None = None) -> None:
    """Open the page with a token in the URL's fragment (kept in localStorage, then removed)."""
    fragment = f"#token={token}" + (f"&c={conversation}" if conversation else "")
    await tab.page.goto(base + "/" + fragment)
    await expect(tab.page.locator("#tokstate")).to_contain_text("Signed in as")


async def signed_in_chat(browsing: Browsing, services: Services, user: str) -> tuple[Tab, str]:
    """A tab signed in as `user`, on a new chat: the tab and the conversation's id."""
    tab = await browsing.tab()
    await open_signed_in(tab, services.edge_url, token_for(user))
    return tab, await new_chat(tab.page)


async def new_chat(page: Page) -> str:
    await page.click("#new")
    await page.wait_for_function("() => location.hash.startsWith('#c=')")
    conversation = str(await page.evaluate("() => decodeURIComponent(location.hash.slice(3))"))
    await expect(page.locator(".empty")).to_contain_text("No messages yet")
    return conversation


async def send(page: Page, text: str) -> None:
    await page.fill("#input", text)
    await page.press("#input", "Enter")


def assistant(page: Page, nth: int = -1) -> Locator:
    return page.locator(".msg.assistant").nth(nth)


async def answer_text(message: Locator) -> str:
    texts = await message.locator(".body > .text").all_text_contents()
    return "".join(texts)


async def finished(message: Locator, status: str = "complete") -> None:
    """The message shows its final row (what a reload shows), not only the stream."""
    await expect(message).to_have_attribute("data-status", status)
    await expect(message).to_have_attribute("data-source", "row")


async def stats(page: Page) -> dict[str, int]:
    result: dict[str, int] = await page.evaluate("() => ({...window.parleyStats})")
    return result


async def messages(api: SseClient, conversation: str) -> list[dict[str, Any]]:
    status, body = await api.request(
        "GET", f"/v1/conversations/{conversation}/messages?versions=all"
    )
    assert status == 200, body
    rows: list[dict[str, Any]] = body["messages"]
    return rows


# ---------------------------------------------------------------- signing in


async def test_signing_in_with_a_token_shows_the_user_and_their_conversations(
    services: Services, browsing: Browsing, api: SseClient, user: str
) -> None:
    status, created = await api.request(
        "POST", "/v1/conversations", json={"title": "Made before signing in"}
    )
    assert status == 201, created
    tab = await browsing.tab()
    page = tab.page
    await page.goto(services.edge_url + "/")
    await expect(page.locator("#tokstate")).to_have_text("Not signed in — paste a token to begin")
    await page.fill("#token", "not-a-token")
    await page.click("#tokform button[type=submit]")
    await expect(page.locator("#banner")).to_contain_text("Not signed in (401)")
    await tab.shot("rejected-token")

    await page.fill("#token", token_for(user))
    await page.click("#tokform button[type=submit]")
    await expect(page.locator("#tokstate")).to_have_text(f"Signed in as {user}")
    entry = page.locator(f'#convs button[data-id="{created["id"]}"]')
    await expect(entry).to_contain_text("Made before signing in")
    await entry.click()
    await expect(page.locator("#title")).to_have_text("Made before signing in")
    await expect(page.locator(".empty")).to_contain_text("No messages yet")
    await tab.shot("signed-in")


async def test_an_error_shown_names_the_request_that_failed(
    services: Services, browsing: Browsing, user: str
) -> None:
    """What a person copies into a report of an error names its request (X-Request-Id):
    the operator finds the edge's lines for it by that id."""
    tab = await browsing.tab()
    page = tab.page
    answered: list[str] = []

    def failed(response: Response) -> None:
        if "/v1/conversations/nosuchconversation" in response.url and response.status == 404:
            answered.append(response.headers["x-request-id"])

    page.on("response", failed)
    await open_signed_in(tab, services.edge_url, token_for(user), "nosuchconversation")
    banner = page.locator("#banner")
    await expect(banner).to_contain_text("This conversation is not there any more")
    await expect(banner).to_contain_text(re.compile(r"request id \S+"))
    shown = re.search(r"request id (\S+)\)", await banner.inner_text())
    assert shown is not None and shown[1] in answered, (shown, answered)


async def test_a_message_no_conversation_could_be_made_for_stays_in_the_input(
    services: Services, browsing: Browsing
) -> None:
    tab = await browsing.tab()
    page = tab.page
    await page.goto(services.edge_url + "/")
    await expect(page.locator("#tokstate")).to_have_text("Not signed in — paste a token to begin")
    await send(page, "typed before signing in")
    await expect(page.locator("#banner")).to_contain_text("Not signed in (401)")
    await expect(page.locator("#input")).to_have_value("typed before signing in")

    await page.fill("#token", "not-a-token")
    await page.click("#tokform button[type=submit]")
    await expect(page.locator("#banner")).to_contain_text("Not signed in (401)")
    await page.click("#banner button")
    await send(page, "typed with a rejected token")
    await expect(page.locator("#banner")).to_contain_text("New chat: Not signed in (401)")
    await expect(page.locator("#input")).to_have_value("typed with a rejected token")
    await expect(page.locator("#convs button")).to_have_count(0)


async def test_the_conversation_list_goes_on_past_its_first_page(
    services: Services, browsing: Browsing, api: SseClient, user: str
) -> None:
    oldest = await api.create_conversation(title="The oldest one")
    for batch in range(4):  # 101 in all: the API gives 100 a page
        await asyncio.gather(
            *(api.create_conversation(title=f"Later {batch}-{i}") for i in range(25))
        )
    tab = await browsing.tab()
    page = tab.page
    await open_signed_in(tab, services.edge_url, token_for(user))
    entries = page.locator("#convs button[data-id]")
    await expect(entries).to_have_count(100)
    entry = page.locator(f'#convs button[data-id="{oldest["id"]}"]')
    await expect(entry).to_have_count(0)
    # (a click that scrolled the list to its end would load the page by scrolling)
    await page.locator("#convs button.more").dispatch_event("click")
    await expect(entries).to_have_count(101)
    await expect(entry).to_contain_text("The oldest one")
    await expect(page.locator("#convs button.more")).to_have_count(0)
    # a reload of the list keeps what was shown
    await page.click("#refresh")
    await expect(entries).to_have_count(101)
    await entry.click()
    await expect(page.locator("#title")).to_have_text("The oldest one")
    # after a reload of the page, scrolling to the end of the list brings the rest
    await page.reload()
    await expect(entries).to_have_count(100)
    await page.locator("#convs button.more").scroll_into_view_if_needed()
    await expect(entries).to_have_count(101)


async def test_a_fragment_that_cannot_be_decoded_is_ignored(
    services: Services, browsing: Browsing, api: SseClient, user: str
) -> None:
    created = await api.create_conversation(title="Listed all the same")
    tab = await browsing.tab()
    page = tab.page
    await open_signed_in(tab, services.edge_url, token_for(user))
    await page.goto(services.edge_url + "/#c=%E0%A4%A")
    await page.reload()  # (a fragment-only goto does not load the page again)
    entry = page.locator(f'#convs button[data-id="{created["id"]}"]')
    await expect(entry).to_contain_text("Listed all the same")
    await expect(page.locator(".empty")).to_contain_text("Pick a conversation")
    await entry.click()
    await expect(page.locator("#title")).to_have_text("Listed all the same")


async def test_markup_that_slipped_into_the_page_runs_nothing(
    services: Services, browsing: Browsing
) -> None:
    """The page never parses users' or models' text as HTML; should a later change
    let some through, its Content-Security-Policy (the page's own inline script and
    style only, by their hashes) still runs none of it: an inline handler slipped in
    is refused, while the page itself works (every other test here runs under it and
    fails on what it refuses)."""
    tab = await browsing.tab()
    page = tab.page
    await open_signed_in(tab, services.edge_url, token_for("csp-user"))
    ran = await page.evaluate(
        """() => new Promise((done) => {
            window.slipped = false;
            document.body.insertAdjacentHTML(
                "beforeend", '<img src="data:," onerror="window.slipped = true">');
            setTimeout(() => done(window.slipped), 500);
        })"""
    )
    assert ran is False
    refused = [error for error in tab.errors if "Content Security Policy" in error]
    assert refused, tab.errors  # refused by the policy, not skipped for another reason
    tab.errors = [error for error in tab.errors if error not in refused]
    async with aiohttp.ClientSession() as http, http.get(services.edge_url + "/") as response:
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_new_chat_clicked_again_and_again_makes_one_conversation(
    services: Services, browsing: Browsing, api: SseClient, user: str
) -> None:
    tab = await browsing.tab()
    page = tab.page
    await open_signed_in(tab, services.edge_url, token_for(user))
    await expect(page.locator("#convs li")).to_have_text(["No conversations yet."])
    await page.locator("#new").evaluate("(b) => { b.click(); b.click(); b.click(); }")
    await expect(page.locator(".empty")).to_contain_text("No messages yet")
    made = await page.evaluate("() => decodeURIComponent(location.hash.slice(3))")
    await page.click("#new")  # the one open is still empty: it is the new chat
    await expect(page.locator("#input")).to_be_focused()
    await send(page, "[[tokens=3]] in the one new chat")
    await finished(assistant(page))
    status, listed = await api.request("GET", "/v1/conversations")
    assert status == 200, listed
    assert [c["id"] for c in listed["conversations"]] == [made], listed
    await expect(page.locator("#convs button[data-id]")).to_have_count(1)

    await page.click("#new")  # once it has messages, New chat makes another
    await expect(page.locator(".empty")).to_contain_text("No messages yet")
    await expect(page.locator("#convs button[data-id]")).to_have_count(2)


# ---------------------------------------------------------------- a turn


async def test_thinking_tool_cards_and_the_answer_stream_in_and_the_title_appears(
    services: Services, browsing: Browsing, api: SseClient, user: str
) -> None:
    tab, conversation = await signed_in_chat(browsing, services, user)
    page = tab.page
    await send(page, "please calculate 6*7")

    user_message = page.locator(".msg.user").first
    await expect(user_message.locator(".body")).to_have_text("please calculate 6*7")
    await expect(page.locator("#title")).to_have_text("please calculate 6*7")
    await expect(page.locator(f'#convs button[data-id="{conversation}"]')).to_contain_text(
        "please calculate 6*7"
    )
    message = assistant(page)
    thinking = message.locator("details.thinking").first
    await expect(thinking).to_contain_text("the calculator tool can answer")
    card = message.locator('.tool[data-tool="calculator"]')
    await expect(card.locator(".args")).to_contain_text('"expression": "6*7"')
    await expect(card.locator(".st")).to_contain_text("done")
    await expect(card.locator(".result")).to_have_text("42")
    await expect(message.locator(".body > .text")).to_have_text("The result is 42.")
    await finished(message)
    await expect(message.locator(".mmeta")).to_contain_text("out tokens")
    await tab.shot("answered-with-a-tool")

    # After a reload the same turn comes from the message rows, tool cards included.
    await page.reload()
    message = assistant(page)
    await finished(message)
    await expect(page.locator("#title")).to_have_text("please calculate 6*7")
    await expect(message.locator("details.thinking")).to_contain_text("calculator tool")
    card = message.locator('.tool[data-tool="calculator"]')
    await expect(card.locator(".result")).to_have_text("42")
    await expect(card.locator(".st")).to_contain_text("done")
    await expect(message.locator(".body > .text")).to_have_text("The result is 42.")
    await expect(page.locator(".msg")).to_have_count(2)
    await tab.shot("reloaded-tool-cards")
    assert (await stats(page))["duplicates"] == 0


async def test_a_long_answer_stays_followed_to_its_end(
    services: Services, browsing: Browsing, user: str
) -> None:
    # The page scrolls to the end as text comes; the browser tells it so with a scroll
    # event a frame later. A piece of many lines that came meanwhile (a long answer at
    # full speed) left the end far below by then, and the page took its own scroll for
    # the reader's leaving the end: it stopped following, the answer ran on below.
    tab, _ = await signed_in_chat(browsing, services, user)
    page = tab.page
    # 1 MB in pieces of 64 KiB, one every 25 ms: each comes about a frame after the last
    await send(page, "[[bulk=1000000]] [[rate=40]] a long answer")
    message = assistant(page)
    await finished(message)
    below = "() => { const l = document.getElementById('log'); return l.scrollHeight - l.scrollTop - l.clientHeight; }"
    await page.wait_for_function(f"() => ({below})() < 60")
    await tab.shot("long-answer-followed")

    # The reader's own scroll up is respected: the answer goes on without pulling them down.
    await send(page, "[[tokens=2400]] count again")
    message = assistant(page)
    await expect(message.locator(".body > .text")).to_contain_text("200 ")
    await page.evaluate("() => { document.getElementById('log').scrollTop = 0; }")
    await expect(message.locator(".body > .text")).to_contain_text("1200 ")
    assert await page.evaluate("() => document.getElementById('log').scrollTop") == 0


async def test_stop_ends_the_answer_and_keeps_what_was_written(
    services: Services, browsing: Browsing, api: SseClient, user: str, projected: Projected
) -> None:
    tab, conversation = await signed_in_chat(browsing, services, user)
    page = tab.page
    await send(page, "[[tokens=4000]] count slowly")  # 10 s: far longer than the test waits
    message = assistant(page)
    await expect(message.locator(".body > .text")).to_contain_text("30 31 ")
    await expect(page.locator("#stop")).to_be_visible()
    await tab.shot("streaming")
    await page.click("#stop")

    await finished(message, "cancelled")
    await expect(message.locator(".badge")).to_have_text("■ stopped")
    await expect(page.locator("#send")).to_be_visible()
    kept = await answer_text(message)
    assert kept.startswith(counted(32)) and len(kept) < len(counted(4000)), kept[-40:]
    assert counted(4000).startswith(kept), f"not a prefix of the answer: ...{kept[-40:]!r}"
    await tab.shot("stopped")

    await projected(conversation)
    rows = await messages(api, conversation)
    answer = next(r for r in rows if r["role"] == "assistant")
    assert answer["status"] == "cancelled"
    assert "".join(b["content"] for b in answer["content"] if b["role"] == "assistant") == kept

    await page.reload()
    message = assistant(page)
    await finished(message, "cancelled")
    assert await answer_text(message) == kept
    await expect(message.locator(".badge")).to_have_text("■ stopped")


async def test_delete_asks_first_then_erases_the_conversation_and_leaves_the_list(
    services: Services, browsing: Browsing, api: SseClient, user: str, event_log: EventLog
) -> None:
    tab, conversation = await signed_in_chat(browsing, services, user)
    page = tab.page
    await send(page, "[[tokens=4000]] count slowly")
    message = assistant(page)
    await expect(message.locator(".body > .text")).to_contain_text("30 31 ")
    entry = page.locator(f'#convs button[data-id="{conversation}"]')
    await expect(entry).to_have_count(1)
    asked: list[str] = []
    answered = asyncio.Event()

    async def answer(dialog: Dialog, accept: bool) -> None:
        asked.append(dialog.message)
        await (dialog.accept() if accept else dialog.dismiss())
        answered.set()

    page.once("dialog", lambda dialog: answer(dialog, False))
    await page.click("#delete")
    async with asyncio.timeout(20):
        await answered.wait()
    assert "erased" in asked[0], asked
    await expect(entry).to_have_count(1)  # dismissed: nothing happened
    await expect(page.locator("#stop")).to_be_visible()

    page.once("dialog", lambda dialog: answer(dialog, True))
    await page.click("#delete")
    await expect(entry).to_have_count(0)
    await expect(page.locator(".empty")).to_contain_text("Pick a conversation")
    await expect(page.locator("#delete")).to_be_hidden()
    await expect(page.locator("#banner")).not_to_be_visible()
    await tab.shot("deleted")
    status, _ = await api.request("GET", f"/v1/conversations/{conversation}")
    assert status == 404
    await page.reload()
    await expect(page.locator("#tokstate")).to_contain_text("Signed in as")
    await expect(page.locator(".msg.assistant")).to_have_count(0)
    await expect(entry).to_have_count(0)


async def test_rename_names_the_conversation_in_every_tab_and_the_list(
    services: Services, browsing: Browsing, user: str
) -> None:
    # The API renames (PATCH .../{id}); the page offered no way to.
    tab, conversation = await signed_in_chat(browsing, services, user)
    page = tab.page
    await send(page, "hello there")
    await finished(assistant(page))
    await expect(page.locator("#title")).to_have_text("hello there")
    other = await browsing.tab()
    await open_signed_in(other, services.edge_url, token_for(user), conversation)
    await expect(other.page.locator("#title")).to_have_text("hello there")

    asked: list[tuple[str, str]] = []

    async def name(dialog: Dialog) -> None:
        asked.append((dialog.message, dialog.default_value))
        await dialog.accept("  Trip to 京都 🚄  ")

    page.once("dialog", name)
    await page.click("#rename")
    for shown in (page, other.page):
        await expect(shown.locator("#title")).to_have_text("Trip to 京都 🚄")
        entry = shown.locator(f'#convs button[data-id="{conversation}"] .c-title')
        await expect(entry).to_have_text("Trip to 京都 🚄")
    assert asked and asked[0][1] == "hello there", asked
    await tab.shot("renamed")
    await other.page.reload()
    await expect(other.page.locator("#title")).to_have_text("Trip to 京都 🚄")


async def test_a_conversation_deleted_elsewhere_leaves_the_other_tab_and_its_link(
    services: Services, browsing: Browsing, api: SseClient, user: str
) -> None:
    # Another tab showing the conversation kept showing its erased messages under a
    # bare "not_found (HTTP 404)", kept it in the list and offered Send and Delete;
    # its link (#c=) reloaded said "Could not load this conversation" and offered Delete.
    tab, conversation = await signed_in_chat(browsing, services, user)
    other = await browsing.tab()
    await open_signed_in(other, services.edge_url, token_for(user), conversation)
    await send(tab.page, "[[tokens=4000]] count slowly")
    await expect(assistant(other.page).locator(".body > .text")).to_contain_text("30 31 ")

    tab.page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await tab.page.click("#delete")
    await expect(tab.page.locator(f'#convs button[data-id="{conversation}"]')).to_have_count(0)

    page = other.page
    await expect(page.locator("#banner")).to_contain_text("deleted (in another tab or client)")
    await expect(page.locator("#banner")).to_contain_text("request id ")
    await expect(page.locator(f'#convs button[data-id="{conversation}"]')).to_have_count(0)
    await expect(page.locator(".empty")).to_contain_text("Pick a conversation")
    await expect(page.locator(".msg")).to_have_count(0)
    await expect(page.locator("#delete")).to_be_hidden()
    await expect(page.locator("#title")).to_have_text("parley")
    assert await page.evaluate("() => location.hash") == ""
    await other.shot("deleted-elsewhere")

    # its link, opened again
    await page.goto("about:blank")
    await page.goto(f"{services.edge_url}/#c={conversation}")
    await expect(page.locator("#tokstate")).to_contain_text("Signed in as")
    await expect(page.locator("#banner")).to_contain_text("not there any more")
    await expect(page.locator(".empty")).to_contain_text("Pick a conversation")
    await expect(page.locator("#delete")).to_be_hidden()
    assert await page.evaluate("() => location.hash") == ""
    status, _ = await api.request("GET", f"/v1/conversations/{conversation}")
    assert status == 404


async def test_a_new_turn_leaves_the_messages_on_screen_in_place(
    services: Services, browsing: Browsing, user: str
) -> None:
    # On a long conversation, building every message again at each turn's start
    # and end froze the page for a moment each time; the earlier ones stay put.
    tab, _ = await signed_in_chat(browsing, services, user)
    page = tab.page
    await send(page, "[[tokens=3]] one")
    await finished(assistant(page))
    await page.evaluate(
        "() => document.querySelectorAll('#inner .msg').forEach((m) => { m.kept = true; })"
    )

    await send(page, "[[tokens=3]] two")
    await expect(page.locator(".msg")).to_have_count(4)
    await finished(assistant(page))
    kept = await page.evaluate(
        "() => [...document.querySelectorAll('#inner .msg')].map((m) => !!m.kept)"
    )
    assert kept == [True, True, False, False]


# ---------------------------------------------------------------- versions


async def test_regenerating_an_answer_adds_a_version_and_the_arrows_flip_between_them(
    services: Services, browsing: Browsing, api: SseClient, user: str, projected: Projected
) -> None:
    tab, conversation = await signed_in_chat(browsing, services, user)
    page = tab.page
    await send(page, "[[tokens=8]] say eight")
    first = assistant(page)
    await finished(first)
    first_id = await first.get_attribute("data-id")
    await expect(first.locator(".versions")).to_be_empty()

    await first.locator("button.regen").click()
    second = assistant(page)
    await expect(second).not_to_have_attribute("data-id", first_id or "")
    await finished(second)
    second_id = await second.get_attribute("data-id")
    assert await answer_text(second) == counted(8)
    await expect(page.locator(".msg.assistant")).to_have_count(1)  # versions replace, not pile up
    await expect(second.locator(".vpos")).to_have_text("2/2")
    await expect(second.locator("button.next")).to_be_disabled()
    await tab.shot("regenerated")

    await projected(conversation)
    rows = await messages(api, conversation)
    answers = sorted(
        (r for r in rows if r["role"] == "assistant"), key=lambda r: r["version_number"]
    )
    assert [r["id"] for r in answers] == [first_id, second_id]
    assert answers[0]["version_group_id"] == answers[1]["version_group_id"]
    assert [r["is_latest"] for r in answers] == [False, True]

    await second.locator("button.prev").click()
    shown = assistant(page)
    await expect(shown).to_have_attribute("data-id", first_id or "")
    await expect(shown.locator(".vpos")).to_have_text("1/2")
    assert await answer_text(shown) == counted(8)
    await shown.locator("button.next").click()
    await expect(assistant(page)).to_have_attribute("data-id", second_id or "")
    await expect(assistant(page).locator(".vpos")).to_have_text("2/2")

    # a reload shows the latest version, still with both reachable
    await page.reload()
    await expect(assistant(page)).to_have_attribute("data-id", second_id or "")
    await expect(assistant(page).locator(".vpos")).to_have_text("2/2")


async def test_editing_a_user_message_streams_a_new_turn_and_keeps_the_old_branch(
    services: Services, browsing: Browsing, api: SseClient, user: str, projected: Projected
) -> None:
    tab, conversation = await signed_in_chat(browsing, services, user)
    page = tab.page
    await send(page, "[[tokens=3]] the first try")
    await finished(assistant(page))
    assert await answer_text(assistant(page)) == counted(3)

    await page.locator(".msg.user button.edit").click()
    box = page.locator(".msg.user textarea.edit-input")
    await expect(box).to_have_value("[[tokens=3]] the first try")
    await box.fill("[[tokens=6]] the second try")
    await tab.shot("editing")
    await page.locator(".msg.user button.save-edit").click()

    edited = page.locator(".msg.user")
    await expect(edited.locator(".body")).to_have_text("[[tokens=6]] the second try")
    await finished(assistant(page))
    assert await answer_text(assistant(page)) == counted(6)
    await expect(page.locator(".msg")).to_have_count(2)
    await expect(edited.locator(".vpos")).to_have_text("2/2")
    await tab.shot("edited")

    await projected(conversation)
    rows = await messages(api, conversation)
    users = sorted((r for r in rows if r["role"] == "user"), key=lambda r: r["version_number"])
    assert [r["content"][0]["content"] for r in users] == [
        "[[tokens=3]] the first try",
        "[[tokens=6]] the second try",
    ]
    assert users[0]["is_fork_origin"] and not users[0]["is_latest"] and users[1]["is_latest"]

    # the old version brings its own answer back with it
    await edited.locator("button.prev").click()
    await expect(page.locator(".msg.user .body")).to_have_text("[[tokens=3]] the first try")
    await expect(page.locator(".msg.user .vpos")).to_have_text("1/2")
    assert await answer_text(assistant(page)) == counted(3)


async def test_a_new_turn_brings_the_view_back_to_the_branch_in_force(
    services: Services, browsing: Browsing, api: SseClient, user: str
) -> None:
    tab, conversation = await signed_in_chat(browsing, services, user)
    page = tab.page
    await send(page, "[[tokens=3]] alpha")
    await finished(assistant(page))
    await assistant(page).locator("button.regen").click()
    await expect(assistant(page).locator(".vpos")).to_have_text("2/2")
    await finished(assistant(page))
    await assistant(page).locator("button.prev").click()
    await expect(assistant(page).locator(".vpos")).to_have_text("1/2")

    # sent while an older answer is on screen: the server answers on the latest one
    await send(page, "[[tokens=200]] beta")
    users = page.locator(".msg.user .body")
    await expect(users).to_have_text(["[[tokens=3]] alpha", "[[tokens=200]] beta"])
    await expect(page.locator(".msg.assistant").first.locator(".vpos")).to_have_text("2/2")
    await finished(assistant(page))
    await expect(users).to_have_text(["[[tokens=3]] alpha", "[[tokens=200]] beta"])
    await expect(page.locator(".msg")).to_have_count(4)
    assert await answer_text(assistant(page)) == counted(200)
    await tab.shot("sent-from-an-old-version")

    # another client's turn, while this tab shows the old version again
    await page.locator(".msg.assistant").first.locator("button.prev").click()
    await expect(page.locator(".msg")).to_have_count(2)
    await api.send_json(conversation, "[[tokens=5]] gamma from elsewhere")
    await expect(users).to_have_text(
        ["[[tokens=3]] alpha", "[[tokens=200]] beta", "[[tokens=5]] gamma from elsewhere"]
    )
    await finished(assistant(page))
    await expect(page.locator(".msg")).to_have_count(6)
    assert await answer_text(assistant(page)) == counted(5)

    await page.reload()
    await expect(page.locator(".msg")).to_have_count(6)
    await expect(users).to_have_text(
        ["[[tokens=3]] alpha", "[[tokens=200]] beta", "[[tokens=5]] gamma from elsewhere"]
    )


# ---------------------------------------------------------------- long conversations


async def long_conversation(api: SseClient, turns: int) -> str:
    """A conversation of `turns` answered questions, `question 0` first."""
    conversation = str((await api.create_conversation(title="A long one"))["id"])
    for n in range(turns):
        events = await api.send_stream(conversation, f"question {n} [[tokens=1]] [[rate=0]]")
        assert events[-1].data == "ok", events
    return conversation


def message_reads(page: Page) -> list[str]:
    """The query of every read of the messages the page makes from now on."""
    reads: list[str] = []

    def seen(request: Request) -> None:
        url = urlsplit(request.url)
        if request.method == "GET" and url.path.endswith("/messages"):
            reads.append(url.query)

    page.on("request", seen)
    return reads


async def test_a_long_conversation_shows_its_last_page_and_loads_the_earlier_ones(
    services: Services, browsing: Browsing, api: SseClient, user: str, projected: Projected
) -> None:
    conversation = await long_conversation(api, 60)  # 120 messages: more than a page
    await projected(conversation)
    tab = await browsing.tab()
    page = tab.page
    reads = message_reads(page)
    await open_signed_in(tab, services.edge_url, token_for(user), conversation)
    shown = page.locator("#inner .msg")
    await expect(shown).to_have_count(100)
    questions = page.locator(".msg.user .body")
    await expect(questions.first).to_have_text("question 10 [[tokens=1]] [[rate=0]]")
    earlier = page.locator("#earlier button.earlier")
    await expect(earlier).to_have_text("Load earlier messages")
    assert reads and all("limit=100" in query for query in reads), reads
    await tab.shot("last-page")

    # what was on screen stays in place while the messages above it come
    await page.locator("#log").evaluate("(log) => { log.scrollTop = 0; }")
    top_id = await page.locator("#inner .msg").first.get_attribute("data-id")
    top = page.locator(f'#inner .msg[data-id="{top_id}"]')
    before = await top.bounding_box()
    await earlier.click()
    await expect(shown).to_have_count(120)
    await expect(earlier).to_have_count(0)
    after = await top.bounding_box()
    assert before is not None and after is not None
    assert abs(after["y"] - before["y"]) < 2, (before, after)
    texts = await questions.all_text_contents()
    assert texts == [f"question {n} [[tokens=1]] [[rate=0]]" for n in range(60)]
    await tab.shot("every-page")

    # a turn reads the last page again, not the whole conversation
    reads.clear()
    await send(page, "[[tokens=3]] one more")
    await finished(assistant(page))
    await expect(shown).to_have_count(122)
    assert await answer_text(assistant(page)) == counted(3)
    assert reads and all("limit=100" in query and "before=" not in query for query in reads), reads

    # and a regeneration on it flips between the versions as on a short one
    await assistant(page).locator("button.regen").click()
    await expect(assistant(page).locator(".vpos")).to_have_text("2/2")
    await finished(assistant(page))
    await assistant(page).locator("button.prev").click()
    await expect(assistant(page).locator(".vpos")).to_have_text("1/2")
    await expect(shown).to_have_count(122)

    # a reload shows the last page again, with the branch in force
    await page.reload()
    await expect(shown).to_have_count(99)  # 100 rows: two are the last answer's versions
    await expect(assistant(page).locator(".vpos")).to_have_text("2/2")
    await expect(earlier).to_be_visible()


async def test_an_edit_further_back_than_a_page_shows_its_versions_and_no_stray_branch(
    services: Services, browsing: Browsing, api: SseClient, user: str, projected: Projected
) -> None:
    conversation = await long_conversation(api, 60)
    await projected(conversation)
    rows = await messages(api, conversation)
    fifth = next(r for r in rows if r["content"][0]["content"].startswith("question 5 "))
    events = await api.send_stream_to(
        f"/v1/conversations/{conversation}/messages/{fifth['id']}",
        {"content": "question 5, edited [[tokens=2]]"},
        method="PATCH",
    )
    assert events[-1].data == "ok", events
    await projected(conversation)

    # The last page holds the end of the branch the edit left, and the edit: only the
    # edit (and its answer) are shown, not the old branch's end as if it were in force.
    tab = await browsing.tab()
    page = tab.page
    await open_signed_in(tab, services.edge_url, token_for(user), conversation)
    edited = page.locator(".msg.user")
    await expect(edited).to_have_count(1)
    await expect(edited.locator(".body")).to_have_text("question 5, edited [[tokens=2]]")
    await expect(page.locator("#inner .msg")).to_have_count(2)
    await expect(edited.locator(".vpos")).to_have_text("2/2")
    await expect(page.locator(".offbranch")).to_have_count(0)
    await finished(assistant(page))
    await tab.shot("edited-long-ago")

    # < reads back as far as the first version (here: to the first message), and
    # shows it with its old branch
    await edited.locator("button.prev").click()
    old = page.locator(".msg.user", has=page.locator(".vpos", has_text="1/2"))
    await expect(old.locator(".body")).to_have_text("question 5 [[tokens=1]] [[rate=0]]")
    await expect(page.locator("#earlier button.earlier")).to_have_count(0)
    questions = page.locator(".msg.user .body")
    asked = [f"question {n} [[tokens=1]] [[rate=0]]" for n in range(60)]
    await expect(questions).to_have_text(asked)
    await expect(page.locator(".msg.user .offbranch")).to_have_count(54)  # 6-59
    await old.locator("button.next").click()
    await expect(questions).to_have_text([*asked[:5], "question 5, edited [[tokens=2]]"])
    await expect(page.locator(".offbranch")).to_have_count(0)


async def test_an_edit_on_an_earlier_page_takes_what_grew_from_it_off_the_branch_on_screen(
    services: Services, browsing: Browsing, api: SseClient, user: str, projected: Projected
) -> None:
    # After a turn the page reads the last page only: messages it read on earlier
    # pages that the edit took off the branch in force must say so all the same.
    conversation = await long_conversation(api, 60)
    await projected(conversation)
    tab = await browsing.tab()
    page = tab.page
    await open_signed_in(tab, services.edge_url, token_for(user), conversation)
    await page.locator("#earlier button.earlier").click()
    questions = page.locator(".msg.user")
    await expect(questions).to_have_count(60)
    fifth = questions.nth(5)
    await fifth.locator("button.edit").click()
    await fifth.locator("textarea.edit-input").fill("question 5, edited [[tokens=2]]")
    await fifth.locator("button.save-edit").click()
    await expect(questions).to_have_count(6)
    await finished(assistant(page))
    await expect(questions.nth(5).locator(".vpos")).to_have_text("2/2")

    await questions.nth(5).locator("button.prev").click()
    await expect(questions).to_have_count(60)
    await expect(questions.nth(5).locator(".vpos")).to_have_text("1/2")
    # every message after it is on the old branch: no Edit, no Regenerate
    await expect(page.locator(".msg.user .offbranch")).to_have_count(54)
    await expect(page.locator(".msg.assistant .offbranch")).to_have_count(55)
    await expect(page.locator(".msg button.edit")).to_have_count(6)
    await expect(page.locator(".msg button.regen")).to_have_count(5)


async def shown_messages(page: Page) -> list[tuple[str, str]]:
    """(role, id) of every message on screen, top to bottom."""
    shown: list[tuple[str, str]] = await page.evaluate(
        """() => [...document.querySelectorAll('#inner .msg')].map((m) =>
            [m.classList.contains('user') ? 'user' : 'assistant', m.dataset.id])"""
    )
    return [(role, mid) for role, mid in shown]


async def test_queued_and_interrupting_turns_are_shown_in_the_conversations_order(
    services: Services, browsing: Browsing, api: SseClient, user: str, projected: Projected
) -> None:
    tab, conversation = await signed_in_chat(browsing, services, user)
    page = tab.page
    first = await api.send_json(conversation, "[[tokens=2000]] X runs first")
    queued = [
        await api.send_json(conversation, f"[[tokens=20]] {name} waits", on_busy="enqueue")
        for name in ("Y", "W")
    ]
    interrupting = await api.send_json(
        conversation, "[[tokens=20]] I interrupts", on_busy="interrupt"
    )
    answers = page.locator('.msg.assistant[data-source="row"]:not([data-status="streaming"])')
    await expect(answers).to_have_count(4)
    await send(page, "[[tokens=5]] Z from the page")
    await expect(page.locator(".msg")).to_have_count(10)
    await finished(assistant(page))
    await tab.shot("queued-turns")

    # The history the model reads: each message followed by its answer, in the
    # order their turns started (the interrupt ran before the two that waited).
    await projected(conversation)
    rows = {r["id"]: r for r in await messages(api, conversation)}
    answer_of = {r["parent_message_id"]: r["id"] for r in rows.values() if r["role"] == "assistant"}
    asked = [first, interrupting, *queued]
    expected = [("user", m["message_id"]) for m in asked]
    expected = [x for pair in ((q, ("assistant", answer_of[q[1]])) for q in expected) for x in pair]
    assert rows[answer_of[first["message_id"]]]["status"] == "cancelled"
    shown = await shown_messages(page)
    assert shown[:8] == expected, (shown, expected)
    assert [role for role, _ in shown[8:]] == ["user", "assistant"]

    await page.reload()
    await expect(page.locator(".msg")).to_have_count(10)
    assert await shown_messages(page) == shown


async def twice(button: Locator) -> None:
    """Two clicks before the page hears back from the first: a quick double click
    (Playwright's dblclick leaves time for an answer to come in between)."""
    await button.evaluate("(b) => { b.click(); b.click(); }")


async def test_a_double_click_on_regenerate_or_save_asks_once(
    services: Services, browsing: Browsing, api: SseClient, user: str, projected: Projected
) -> None:
    tab, conversation = await signed_in_chat(browsing, services, user)
    page = tab.page
    await send(page, "[[tokens=200]] the question")
    await finished(assistant(page))
    await twice(assistant(page).locator("button.regen"))
    await expect(assistant(page).locator(".vpos")).to_have_text("2/2")
    await finished(assistant(page))
    await expect(page.locator("#banner")).to_be_hidden()

    await page.locator(".msg.user button.edit").click()
    await page.locator(".msg.user textarea.edit-input").fill("[[tokens=200]] the edit")
    await twice(page.locator(".msg.user button.save-edit"))
    await expect(page.locator(".msg.user .vpos")).to_have_text("2/2")
    await finished(assistant(page))
    assert await answer_text(assistant(page)) == counted(200)
    await expect(page.locator(".msg.user textarea.edit-input")).to_have_count(0)
    await expect(page.locator("#banner")).to_be_hidden()

    await projected(conversation)
    rows = await messages(api, conversation)
    assert sorted(r["role"] for r in rows) == ["assistant"] * 3 + ["user"] * 2, rows


async def test_an_earlier_branch_offers_no_edit_or_regenerate_it_would_refuse(
    services: Services, browsing: Browsing, user: str
) -> None:
    tab, _ = await signed_in_chat(browsing, services, user)
    page = tab.page
    for text in ("[[tokens=3]] one", "[[tokens=4]] two"):
        await send(page, text)
        await finished(assistant(page))
    await page.locator(".msg.assistant").first.locator("button.regen").click()
    await expect(page.locator(".msg")).to_have_count(2)  # "two" grew from the old answer
    await finished(assistant(page))
    await expect(assistant(page).locator(".vpos")).to_have_text("2/2")

    await assistant(page).locator("button.prev").click()
    msgs = page.locator(".msg")
    await expect(msgs).to_have_count(4)
    await tab.shot("earlier-branch")
    # the first message and its answer are in force (their groups have a latest version)
    await expect(msgs.nth(0).locator("button.edit")).to_be_visible()
    await expect(msgs.nth(1).locator("button.regen")).to_be_visible()
    # what grew from the old answer is not: the server would refuse both (409 superseded)
    for later in (msgs.nth(2), msgs.nth(3)):
        await expect(later.locator("button.edit, button.regen")).to_have_count(0)
        await expect(later.locator(".offbranch")).to_have_text("earlier branch")
    await msgs.nth(1).locator("button.next").click()
    await expect(msgs).to_have_count(2)
    await expect(page.locator(".offbranch")).to_have_count(0)


async def test_an_edit_refused_as_busy_keeps_what_was_typed_and_says_what_to_do(
    services: Services, browsing: Browsing, api: SseClient, user: str
) -> None:
    tab, conversation = await signed_in_chat(browsing, services, user)
    page = tab.page
    await send(page, "[[tokens=3]] the first try")
    await finished(assistant(page))
    await page.locator(".msg.user button.edit").click()
    box = page.locator(".msg.user textarea.edit-input")
    await box.fill("a carefully typed edit")
    # meanwhile another client of the same user starts a long answer
    await api.send_json(conversation, "[[tokens=400]] from elsewhere")
    await page.locator(".msg.user button.save-edit").first.click()
    await expect(page.locator("#banner")).to_contain_text("An answer is still being written")
    await expect(page.locator(".msg.user textarea.edit-input")).to_have_value(
        "a carefully typed edit"
    )
    await tab.shot("edit-refused")
    status, body = await api.request("POST", f"/v1/conversations/{conversation}/cancel")
    assert status == 202, body


async def test_another_clients_refused_request_is_shown_as_a_refusal_not_a_failed_turn(
    services: Services, browsing: Browsing, api: SseClient, user: str, projected: Projected
) -> None:
    tab, conversation = await signed_in_chat(browsing, services, user)
    page = tab.page
    await send(page, "[[tokens=3]] one")
    await finished(assistant(page))
    await projected(conversation)
    [question] = [r for r in await messages(api, conversation) if r["role"] == "user"]
    # another client asks for a new answer to a user message: refused, nothing runs
    status, body = await api.request(
        "POST", f"/v1/conversations/{conversation}/messages/{question['id']}/regenerate", json={}
    )
    assert status == 404, body
    refused = page.locator("#banner")
    await expect(refused).to_contain_text("A request on this conversation was refused (not_found)")
    await expect(refused).to_contain_text("Nothing ran")
    await expect(page.locator("#status")).to_have_text("")
    await tab.shot("refused-elsewhere")
    await expect(page.locator(".msg")).to_have_count(2)
    await finished(assistant(page))
    await expect(assistant(page).locator("button.regen")).to_be_visible()
    # and the conversation goes on as before
    await send(page, "[[tokens=4]] two")
    await expect(page.locator(".msg")).to_have_count(4)
    await finished(assistant(page))
    await expect(page.locator("#banner")).to_be_hidden()
    await expect(page.locator("#status")).to_have_text("")


# ---------------------------------------------------------------- resuming


async def test_reloading_in_the_middle_of_an_answer_resumes_it_without_loss_or_duplication(
    services: Services, browsing: Browsing, user: str
) -> None:
    tab = await browsing.tab()
    page = tab.page
    await open_signed_in(tab, services.edge_url, token_for(user))
    await new_chat(page)
    await send(page, "[[tokens=1600]] count")  # 4 s
    await expect(assistant(page).locator(".body > .text")).to_contain_text("40 41 ")
    await page.reload()

    message = assistant(page)
    await expect(message).to_have_attribute("data-status", "streaming")
    await tab.shot("resumed-mid-answer")
    await finished(message)
    assert await answer_text(message) == counted(1600)
    await expect(page.locator(".msg")).to_have_count(2)
    seen = await stats(page)
    assert seen["duplicates"] == 0, seen


class CuttingProxy:
    """A TCP proxy in front of the edge that can drop every connection at once: a
    real dropped connection, as a flaky network makes one, in the middle of a stream.
    Meanwhile it can refuse new connections (`refusing`: a server that is down), or
    answer every request itself (`answer`: raw HTTP, a server that says no)."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        assert parts.hostname is not None and parts.port is not None
        self.host, self.port = parts.hostname, parts.port
        self.links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.server: asyncio.Server | None = None
        self.serving: set[asyncio.Task[Any]] = set()
        self.refusing = False
        self.answer: bytes | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def cut(self) -> int:
        """Reset every open connection, both sides; returns how many there were."""
        links = list(self.links)
        for client, upstream in links:
            client.transport.abort()
            upstream.transport.abort()
        return len(links)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.cut()  # every pipe then ends on its own: nothing is cancelled
        await asyncio.gather(*self.serving)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.serving.add(task)
        if self.refusing:
            writer.transport.abort()
            self.serving.discard(task)
            return
        if self.answer is not None:
            await self._answer(reader, writer, self.answer)
            self.serving.discard(task)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.transport.abort()
            self.serving.discard(task)
            return
        link = (writer, up_writer)
        self.links.add(link)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self.links.discard(link)
        self.serving.discard(task)

    @staticmethod
    async def _answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes
    ) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        writer.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass  # cut, or the other side went away: the other pipe ends too
        writer.transport.abort()


async def test_a_fresh_token_after_one_expired_mid_answer_shows_the_answer_whole(
    services: Services, browsing: Browsing, user: str
) -> None:
    # The edge ends a stream when its token expires; the page says so. Signing in
    # again with a fresh token left the conversation: its answer, which went on on
    # the server, was seen only by finding the conversation in the list again.
    tab = await browsing.tab()
    page = tab.page
    # refused 5 s from now (the edge gives a token 30 s past its `exp`)
    await open_signed_in(tab, services.edge_url, mint(SECRET, user, ttl_s=-25))
    conversation = await new_chat(page)
    await send(page, "[[tokens=4000]] count slowly")  # 10 s
    await expect(page.locator("#banner")).to_contain_text("token expired")
    # the refusal named as every other error is, for a report of it
    await expect(page.locator("#banner")).to_contain_text(re.compile(r"\(request id \S+\)"))
    await expect(page.locator("#status")).to_have_text("disconnected")
    await tab.shot("token-expired")

    await page.fill("#token", token_for(user))
    await page.click("#tokform button[type=submit]")
    await page.wait_for_function(f"() => location.hash === '#c={conversation}'")
    message = assistant(page)
    await finished(message)
    assert await answer_text(message) == counted(4000)
    await expect(page.locator("#banner")).not_to_be_visible()


async def test_a_dropped_connection_resumes_from_the_last_event_id(
    services: Services, browsing: Browsing, user: str, event_log: EventLog
) -> None:
    proxy = CuttingProxy(services.edge_url)
    base = await proxy.start()
    try:
        tab = await browsing.tab()
        page = tab.page
        afters: list[int] = []  # the log positions the page resumed from

        def note(request: Request) -> None:
            if match := re.search(r"/events\?after=(\d+)", request.url):
                afters.append(int(match.group(1)))

        page.on("request", note)
        await open_signed_in(tab, base, token_for(user))
        conversation = await new_chat(page)
        await send(page, "[[tokens=1600]] count")
        message = assistant(page)
        await expect(message.locator(".body > .text")).to_contain_text("40 41 ")
        assert proxy.cut() > 0
        await finished(message)
        assert await answer_text(message) == counted(1600)
        seen = await stats(page)
        assert seen["duplicates"] == 0 and seen["drops"] >= 1, seen
        # (after the turn's `done` the page also follows on from there, for the next turn)
        done_at = await event_log.last_seq(conversation)
        assert any(after < done_at for after in afters), (afters, done_at)
    finally:
        await proxy.close()


_EXPIRED = b'{"error": {"code": "unauthorized", "message": "token expired"}}'
UNAUTHORIZED = (
    b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_EXPIRED), _EXPIRED)
)


async def test_the_status_says_connection_lost_only_while_it_is(
    services: Services, browsing: Browsing, user: str
) -> None:
    proxy = CuttingProxy(services.edge_url)
    base = await proxy.start()
    try:
        tab = await browsing.tab()
        page = tab.page
        await open_signed_in(tab, base, token_for(user))
        await new_chat(page)
        await send(page, "[[tokens=3]] before the server goes away")
        await finished(assistant(page))
        status = page.locator("#status")

        proxy.refusing = True  # the server goes away, then comes back
        assert proxy.cut() > 0
        await expect(status).to_have_text("connection lost — reconnecting…")
        await tab.shot("connection-lost")
        proxy.refusing = False
        await expect(status).to_have_text("")
        await send(page, "[[tokens=4]] after it came back")
        await expect(page.locator(".msg")).to_have_count(4)
        await finished(assistant(page))
        assert await answer_text(assistant(page)) == counted(4)
        await expect(status).to_have_text("")

        proxy.refusing = True  # and when it comes back, it no longer takes the token
        assert proxy.cut() > 0
        await expect(status).to_have_text("connection lost — reconnecting…")
        proxy.answer = UNAUTHORIZED
        proxy.refusing = False
        await expect(page.locator("#banner")).to_contain_text("Not signed in (401)")
        await expect(status).to_have_text("disconnected")
    finally:
        await proxy.close()


# ---------------------------------------------------------------- two tabs


async def test_two_tabs_on_one_conversation_see_the_same_turn_and_either_can_stop_it(
    services: Services, browsing: Browsing, user: str
) -> None:
    first = await browsing.tab()
    await open_signed_in(first, services.edge_url, token_for(user))
    conversation = await new_chat(first.page)
    await send(first.page, "[[tokens=5]] hello from the first tab")
    await finished(assistant(first.page))

    second = await browsing.tab()  # same browser profile: the token is already there
    await second.page.goto(f"{services.edge_url}/#c={conversation}")
    await expect(assistant(second.page)).to_have_attribute("data-status", "complete")
    assert await answer_text(assistant(second.page)) == counted(5)

    await send(first.page, "[[tokens=4000]] a long one from the first tab")
    await expect(second.page.locator(".msg.user").nth(1).locator(".body")).to_have_text(
        "[[tokens=4000]] a long one from the first tab"
    )
    await expect(assistant(second.page).locator(".body > .text")).to_contain_text("20 21 ")
    await expect(second.page.locator("#stop")).to_be_visible()
    await second.shot("watching-the-other-tab")
    await second.page.click("#stop")

    for tab in (first, second):
        await finished(assistant(tab.page), "cancelled")
        await expect(tab.page.locator(".msg")).to_have_count(4)
    texts = [await answer_text(assistant(tab.page)) for tab in (first, second)]
    assert texts[0] == texts[1] and counted(4000).startswith(texts[0]), [t[-30:] for t in texts]
    await first.shot("stopped-by-the-other-tab")


LEFT_TO_RIGHT = """([selector, word]) => {
    // whether `word`, in a text node of what `selector` finds, is laid out left to right
    const e = document.querySelector(selector);
    if (!e) return false;
    const walker = document.createTreeWalker(e, NodeFilter.SHOW_TEXT);
    for (let n; (n = walker.nextNode()); ) {
        const i = n.data.indexOf(word);
        if (i < 0) continue;
        const left = (k) => {
            const r = document.createRange();
            r.setStart(n, k);
            r.setEnd(n, k + 1);
            return r.getBoundingClientRect().left;
        };
        return left(i) < left(i + word.length - 1);
    }
    return false;
}"""


async def left_to_right(page: Page, selector: str, word: str) -> None:
    await page.wait_for_function(LEFT_TO_RIGHT, arg=[selector, word], timeout=20_000)


async def test_an_override_character_turns_around_nothing_after_its_text(
    services: Services, browsing: Browsing, api: SseClient, user: str
) -> None:
    status, created = await api.request("POST", "/v1/projects", json={"name": "\u202eevil"})
    assert status == 201, created
    conversation = await api.create_conversation(project_id=created["id"])
    tab = await browsing.tab()
    page = tab.page
    await open_signed_in(tab, services.edge_url, token_for(user), conversation["id"])
    entry = page.locator(f'#convs button[data-id="{conversation["id"]}"]')
    await expect(entry.locator(".c-meta")).to_contain_text("0 messages")
    await left_to_right(page, f'#convs button[data-id="{conversation["id"]}"] .c-meta', "messages")
    await expect(page.locator("#meta-scope")).to_contain_text("Project:")
    await left_to_right(page, "#meta-scope", "Project")

    await page.click("#new")  # a personal one: the project has no credits
    await expect(page.locator("#meta-scope")).to_have_text("Personal")
    await expect(page.locator(".empty")).to_contain_text("No messages yet")
    await send(page, "[[tokens=3]] \u202ereversed by its writer")
    await finished(assistant(page))
    entry = page.locator("#convs button.active")
    body = page.locator(".msg.user .body")
    await expect(body).to_have_attribute("dir", "auto")
    await expect(assistant(page).locator(".body > .text")).to_have_attribute("dir", "auto")
    await expect(page.locator("#title")).to_have_attribute("dir", "auto")
    await expect(entry.locator(".c-title")).to_have_attribute("dir", "auto")
    for isolate in (body, page.locator("#title"), entry.locator(".c-title")):
        # waited for, not read once: the list is drawn again as the turn's title comes,
        # and an element read as it is replaced has no computed style ("")
        await expect(isolate).to_have_css("unicode-bidi", "isolate")
    await tab.shot("bidi-override")


# ---------------------------------------------------------------- projects and billing


async def grant(http: aiohttp.ClientSession, base: str, project: str, micro: int) -> None:
    admin = SseClient(http, base, token_for("page-ops", admin=True))
    status, body = await admin.request(
        "POST", f"/v1/billing/accounts/project/{project}/credits", json={"micro_credits": micro}
    )
    assert status == 201, body


async def create_project_in_page(page: Page, name: str) -> str:
    async def accept(dialog: Dialog) -> None:
        await dialog.accept(name)

    page.once("dialog", accept)
    await page.click("#newproject")
    selected = page.locator("#project option:checked")
    await expect(selected).to_have_text(name)
    return str(await page.locator("#project").input_value())


async def test_a_project_conversation_shows_the_balance_and_the_token_total(
    services: Services,
    browsing: Browsing,
    api: SseClient,
    http: aiohttp.ClientSession,
    user: str,
    projected: Projected,
) -> None:
    tab = await browsing.tab()
    page = tab.page
    await open_signed_in(tab, services.edge_url, token_for(user))
    project = await create_project_in_page(page, "Browser project")
    granted = 5_000_000
    await grant(http, services.edge_url, project, granted)

    conversation = await new_chat(page)
    await expect(page.locator("#meta-scope")).to_have_text("Project: Browser project")
    await send(page, "[[tokens=40]] count for the bill")
    await finished(assistant(page))

    await projected(conversation)
    _, row = await api.request("GET", f"/v1/conversations/{conversation}")
    assert row["project_id"] == project and row["token_usage_total"] > 40, row
    await expect(page.locator("#meta-tokens")).to_have_attribute(
        "data-tokens", str(row["token_usage_total"])
    )
    await expect(page.locator("#meta-tokens")).to_have_text(f"{row['token_usage_total']} tokens")
    # The balance shown is the project's after this turn's charge (a few hundred
    # micro-credits at the demo model's prices): the page waits for the ledger to have it.
    balance = page.locator("#meta-balance")
    await expect(balance).to_have_attribute("data-micro", re.compile(r"^4\d{6}$"))
    shown = int(await balance.get_attribute("data-micro") or "")
    _, ledger = await api.request("GET", f"/v1/billing/ledger?conversation={conversation}")
    [entry] = ledger["entries"]
    _, account = await api.request("GET", f"/v1/billing/accounts/project/{project}")
    assert shown == account["balance_micro_credits"] == granted - entry["cost"], (account, entry)
    await expect(balance).to_have_text(f"Balance: {shown / 1e6:.6f}".rstrip("0") + " credits")
    await expect(page.locator(f'#convs button[data-id="{conversation}"]')).to_contain_text(
        "Browser project"
    )
    await tab.shot("project-balance")


async def test_a_billing_error_is_shown_plainly_and_credits_let_the_next_turn_run(
    services: Services,
    browsing: Browsing,
    api: SseClient,
    http: aiohttp.ClientSession,
    user: str,
) -> None:
    status, created = await api.request("POST", "/v1/projects", json={"name": "No credits yet"})
    assert status == 201, created
    project = created["id"]
    tab = await browsing.tab()
    page = tab.page
    await open_signed_in(tab, services.edge_url, token_for(user))
    await page.select_option("#project", label="No credits yet")
    await new_chat(page)
    await expect(page.locator("#meta-balance")).to_have_attribute("data-micro", "0")
    await send(page, "[[tokens=5]] will this be paid?")

    refused = assistant(page)
    await finished(refused, "billing_error")
    notice = refused.locator(".notice.billing")
    await expect(notice).to_contain_text("Not enough credits:")
    await expect(notice).to_contain_text("has 0 micro-credits")
    await expect(refused.locator(".badge")).to_have_text("■ not enough credits")
    await expect(page.locator("#banner")).to_contain_text("Not enough credits")
    await expect(refused.locator(".body > .text")).to_have_count(0)
    await tab.shot("billing-error")

    await page.reload()  # the refusal is stored: it is still there after a reload
    await finished(assistant(page), "billing_error")
    notice = assistant(page).locator(".notice.billing")
    await expect(notice).to_contain_text("Not enough credits:")
    await expect(notice).to_contain_text("has 0 micro-credits")

    await grant(http, services.edge_url, project, 5_000_000)
    await assistant(page).locator("button.regen").click()
    answered = assistant(page)
    await finished(answered)
    assert await answer_text(answered) == counted(5)
    await expect(answered.locator(".vpos")).to_have_text("2/2")
    # now the project pays: its balance is what the grant left after this turn
    await expect(page.locator("#meta-balance")).to_have_attribute(
        "data-micro", re.compile(r"^4\d{6}$")
    )
    await tab.shot("after-credits")
