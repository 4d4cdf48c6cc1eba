"""The pure content rules (DESIGN section 4): block merging, history, tools, titles.

No server and no I/O: each case is a table row or a hypothesis property, and
expected values are written out by hand or computed independently of
`actors.content`, so a bug cannot hide in a copied expectation.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.content import (
    PERSONAL_SYSTEM_PROMPT,
    HistoryMessage,
    auto_title,
    build_history,
    merge_blocks,
    needs_title,
    refused_tool,
    visible_tools,
)
from events.vocabulary import ChunkKind, ContentBlock

Piece = tuple[ChunkKind | None, str]


def thinking(text: str) -> ContentBlock:
    return ContentBlock(role="thinking", content=text)


def answer(text: str) -> ContentBlock:
    return ContentBlock(role="assistant", content=text)


# ---------------------------------------------------------------- merge_blocks: table

MERGE_CASES: list[tuple[str, list[Piece], list[ContentBlock]]] = [
    ("nothing streamed", [], []),
    ("one answer token", [("answer", "Hello")], [answer("Hello")]),
    (
        "consecutive answer tokens become one block",
        [("answer", "Hel"), ("answer", "lo"), ("answer", " world")],
        [answer("Hello world")],
    ),
    (
        "thinking then answer are two blocks in stream order",
        [("thinking", "Let me "), ("thinking", "see"), ("answer", "Yes.")],
        [thinking("Let me see"), answer("Yes.")],
    ),
    (
        "spaces between thinking tokens survive: stripped once on the merged block",
        [("thinking", "  I "), ("thinking", "think"), ("thinking", " so "), ("thinking", "\n")],
        [thinking("I think so")],
    ),
    (
        "answer text is kept verbatim, leading and trailing whitespace included",
        [("answer", "  two "), ("answer", "spaces\n")],
        [answer("  two spaces\n")],
    ),
    (
        "a boundary splits a run of the same kind into two blocks",
        [("answer", "before"), (None, ""), ("answer", "after")],
        [answer("before"), answer("after")],
    ),
    (
        "a boundary splits thinking too",
        [("thinking", "plan"), (None, ""), ("thinking", "check")],
        [thinking("plan"), thinking("check")],
    ),
    (
        "boundaries alone produce nothing",
        [(None, ""), (None, ""), (None, "ignored text")],
        [],
    ),
    (
        "leading, trailing and repeated boundaries leave no trace",
        [(None, ""), ("answer", "a"), (None, ""), (None, ""), ("answer", "b"), (None, "")],
        [answer("a"), answer("b")],
    ),
    ("an empty answer block is dropped", [("answer", ""), ("answer", "")], []),
    (
        "a whitespace-only answer block is dropped",
        [("answer", " "), ("answer", "\n\t")],
        [],
    ),
    (
        "a whitespace-only thinking block is dropped",
        [("thinking", " "), ("thinking", "\n"), ("answer", "ok")],
        [answer("ok")],
    ),
    (
        "an answer run made only of whitespace tokens around a boundary is dropped",
        [("thinking", "hmm"), (None, ""), ("answer", " "), (None, ""), ("thinking", "done")],
        [thinking("hmm"), thinking("done")],
    ),
    (
        "alternating kinds give alternating blocks",
        [("thinking", "a"), ("answer", "b"), ("thinking", "c"), ("answer", "d")],
        [thinking("a"), answer("b"), thinking("c"), answer("d")],
    ),
    (
        "a blank block between two runs of the other kind is dropped after merging",
        [("answer", "one"), ("thinking", "  "), ("answer", "two")],
        [answer("one"), answer("two")],
    ),
    (
        "unicode text merges unchanged",
        [("answer", "Grüße, "), ("answer", "世界 "), ("answer", "🙂")],
        [answer("Grüße, 世界 🙂")],
    ),
]


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [pytest.param(pieces, expected, id=name) for name, pieces, expected in MERGE_CASES],
)
def test_merging_streamed_pieces_gives_the_stored_blocks(
    pieces: list[Piece], expected: list[ContentBlock]
) -> None:
    seen = merge_blocks(pieces)
    assert seen == expected, f"pieces {pieces!r}: expected {expected!r}, saw {seen!r}"


def test_merging_accepts_any_iterable_once() -> None:
    pieces: list[Piece] = [("answer", "a"), ("answer", "b")]
    seen = merge_blocks(iter(pieces))
    assert seen == [answer("ab")], f"expected one block 'ab' from a generator, saw {seen!r}"


# ---------------------------------------------------------------- merge_blocks: properties

# Tokens as a model streams them: words, spaces, newlines, unicode, and blanks.
token = st.one_of(
    st.sampled_from(["", " ", "  ", "\n", "\t", "the", " cat", "sat ", "é", "日本", "🙂", ".\n"]),
    st.text(max_size=6),
)
KINDS: list[ChunkKind] = ["thinking", "answer"]
kind: st.SearchStrategy[ChunkKind] = st.sampled_from(KINDS)
piece = st.one_of(st.tuples(kind, token), st.just((None, "")))
pieces_strategy = st.lists(piece, max_size=40)


def runs_of(pieces: list[Piece]) -> list[tuple[ChunkKind, str]]:
    """Maximal runs of consecutive same-kind pieces, computed without actors.content."""
    runs: list[tuple[ChunkKind, list[str]]] = []
    previous: ChunkKind | None = None
    for k, text in pieces:
        if k is None:
            previous = None
            continue
        if runs and previous == k:
            runs[-1][1].append(text)
        else:
            runs.append((k, [text]))
        previous = k
    return [(k, "".join(parts)) for k, parts in runs]


def expected_blocks(pieces: list[Piece]) -> list[ContentBlock]:
    out: list[ContentBlock] = []
    for k, text in runs_of(pieces):
        if k == "thinking" and text.strip():
            out.append(thinking(text.strip()))
        elif k == "answer" and text.strip():
            out.append(answer(text))
    return out


@settings(max_examples=200, deadline=None)
@given(pieces_strategy)
def test_blocks_are_the_non_blank_runs_in_order(pieces: list[Piece]) -> None:
    expected = expected_blocks(pieces)
    seen = merge_blocks(pieces)
    assert seen == expected, f"pieces {pieces!r}: expected {expected!r}, saw {seen!r}"


@settings(max_examples=200, deadline=None)
@given(pieces_strategy)
def test_answer_text_is_the_concatenation_of_its_non_blank_runs(pieces: list[Piece]) -> None:
    runs = [text for k, text in runs_of(pieces) if k == "answer" and text.strip()]
    seen = [b.content for b in merge_blocks(pieces) if b.role == "assistant"]
    assert seen == runs, f"expected answer blocks {runs!r}, saw {seen!r}"
    assert "".join(seen) == "".join(runs)


@settings(max_examples=200, deadline=None)
@given(pieces_strategy)
def test_every_block_is_non_blank_and_thinking_is_stripped(pieces: list[Piece]) -> None:
    for block in merge_blocks(pieces):
        assert block.content.strip(), f"blank block {block!r} from {pieces!r}"
        if block.role == "thinking":
            assert block.content == block.content.strip(), f"unstripped {block!r}"


# Tokens with visible text: every run made of them is non-blank, so none is dropped.
solid_token = st.text(min_size=1, max_size=6).filter(lambda t: bool(t.strip()))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(kind, solid_token), max_size=40))
def test_without_boundaries_adjacent_blocks_differ_in_role(pieces: list[Piece]) -> None:
    # Two adjacent blocks of one role need a boundary between them (or a blank run
    # of the other kind that was dropped after merging; see MERGE_CASES).
    roles = [b.role for b in merge_blocks(pieces)]
    for left, right in itertools.pairwise(roles):
        assert left != right, f"adjacent {left!r} blocks from {pieces!r}: roles {roles!r}"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(kind, solid_token), max_size=40))
def test_a_boundary_between_every_piece_gives_one_block_per_piece(pieces: list[Piece]) -> None:
    separated: list[Piece] = []
    for p in pieces:
        separated.extend([p, (None, "")])
    seen = merge_blocks(separated)
    assert len(seen) == len(pieces), f"expected {len(pieces)} blocks, saw {seen!r}"


@st.composite
def runs_and_two_splits(
    draw: st.DrawFn,
) -> tuple[list[Piece], list[Piece]]:
    """The same runs of text, each cut into pieces in two different ways."""
    texts = draw(st.lists(st.tuples(kind, st.text(min_size=0, max_size=20)), max_size=8))
    first: list[Piece] = []
    second: list[Piece] = []
    for k, text in texts:
        for out in (first, second):
            cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=5)))
            bounds = [0, *cuts, len(text)]
            out.extend((k, text[a:b]) for a, b in itertools.pairwise(bounds))
            out.append((None, ""))  # runs stay apart even when neighbours share a kind
    return first, second


@settings(max_examples=200, deadline=None)
@given(runs_and_two_splits())
def test_how_a_run_was_split_into_pieces_does_not_matter(
    splits: tuple[list[Piece], list[Piece]],
) -> None:
    first, second = splits
    a, b = merge_blocks(first), merge_blocks(second)
    assert a == b, f"split {first!r} gave {a!r}, split {second!r} gave {b!r}"


# ---------------------------------------------------------------- build_history


def test_history_keeps_the_given_order_and_takes_each_roles_text() -> None:
    messages = [
        HistoryMessage(role="system", blocks=("Be brief.", "ignored second block")),
        HistoryMessage(role="user", blocks=("What is 2+2?", "ignored")),
        HistoryMessage(
            role="assistant",
            assistant_blocks=(thinking("add them"), answer("4"), thinking("more"), answer("Done.")),
        ),
        HistoryMessage(role="user", blocks=("Thanks",)),
    ]
    expected = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4\nDone."},
        {"role": "user", "content": "Thanks"},
    ]
    seen = build_history(messages, personal=False)
    assert seen == expected, f"expected {expected!r}, saw {seen!r}"


def test_personal_scope_puts_the_personal_system_prompt_first() -> None:
    messages = [HistoryMessage(role="user", blocks=("hi",))]
    seen = build_history(messages, personal=True)
    expected = [
        {"role": "system", "content": PERSONAL_SYSTEM_PROMPT},
        {"role": "user", "content": "hi"},
    ]
    assert seen == expected, f"expected {expected!r}, saw {seen!r}"


def test_project_scope_adds_no_system_prompt() -> None:
    seen = build_history([HistoryMessage(role="user", blocks=("hi",))], personal=False)
    assert seen == [{"role": "user", "content": "hi"}], f"saw {seen!r}"


def test_personal_scope_with_no_messages_sends_only_the_prompt() -> None:
    seen = build_history([], personal=True)
    assert seen == [{"role": "system", "content": PERSONAL_SYSTEM_PROMPT}], f"saw {seen!r}"


@pytest.mark.parametrize("role", ["tool", "developer", "", "USER", "Assistant"])
def test_an_unknown_role_is_sent_as_user(role: str) -> None:
    seen = build_history([HistoryMessage(role=role, blocks=("text",))], personal=False)
    assert seen == [{"role": "user", "content": "text"}], f"role {role!r}: saw {seen!r}"


def test_a_user_message_without_blocks_is_sent_empty() -> None:
    seen = build_history([HistoryMessage(role="user")], personal=False)
    assert seen == [{"role": "user", "content": ""}], f"saw {seen!r}"


@pytest.mark.parametrize(
    "blocks",
    [
        pytest.param((), id="no blocks (failed before any text)"),
        pytest.param((thinking("only thinking"),), id="only thinking"),
    ],
)
def test_empty_assistant_answers_are_left_out(blocks: tuple[ContentBlock, ...]) -> None:
    messages = [
        HistoryMessage(role="user", blocks=("q",)),
        HistoryMessage(role="assistant", assistant_blocks=blocks),
        HistoryMessage(role="user", blocks=("q again",)),
    ]
    expected = [{"role": "user", "content": "q"}, {"role": "user", "content": "q again"}]
    seen = build_history(messages, personal=False)
    assert seen == expected, f"expected {expected!r}, saw {seen!r}"


# ---------------------------------------------------------------- visible_tools


def tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


PROJECT_ONLY = [
    "project_list_files",
    "git_log",
    "repo_search",
    "send_message",
    "retract_message",
    "project_",
]
EVERYWHERE = [
    "get_weather",
    "set_title",
    "projects",  # no underscore: not the project_ prefix
    "my_git_log",  # the prefix must be at the start
    "send_message_later",  # exact names only
    "Project_list",  # prefixes are case-sensitive
    "github_search",
]


def test_personal_scope_hides_project_tools_and_keeps_the_rest_in_order() -> None:
    tools = [tool(name) for name in [*PROJECT_ONLY, *EVERYWHERE]]
    seen = [t["function"]["name"] for t in visible_tools(tools, personal=True)]
    assert seen == EVERYWHERE, f"expected {EVERYWHERE!r}, saw {seen!r}"


def test_project_scope_hides_nothing() -> None:
    tools = [tool(name) for name in [*PROJECT_ONLY, *EVERYWHERE]]
    seen = visible_tools(tools, personal=False)
    assert seen == tools, f"expected all {len(tools)} tools, saw {seen!r}"
    assert seen is not tools, "the caller's list must not be handed back for mutation"


def test_tools_without_a_function_name_stay_visible_in_personal_scope() -> None:
    odd: list[dict[str, Any]] = [{"type": "function"}, {"function": "not a dict"}]
    seen = visible_tools(odd, personal=True)
    assert seen == odd, f"expected {odd!r}, saw {seen!r}"


def test_a_hidden_tool_named_anyway_is_refused_only_in_personal_scope() -> None:
    for name in PROJECT_ONLY:
        refused = refused_tool(name, personal=True)
        assert refused is not None and refused.error is not None, name
        assert name in refused.error and "personal" in refused.error, refused
        assert refused_tool(name, personal=False) is None, name
    for name in EVERYWHERE:
        assert refused_tool(name, personal=True) is None, name


# ---------------------------------------------------------------- titles

TITLE_CASES: list[tuple[str, str, str]] = [
    ("empty message", "", ""),
    ("whitespace only", "  \n\t ", ""),
    ("all words of two characters or fewer", "hi I am ok so is it", ""),
    ("short words are skipped", "How do I rotate the API keys", "How rotate the API keys"),
    (
        "only the first five long words",
        "one two three four five six seven",
        "one two three four five",
    ),
    ("exactly three characters is long enough", "abc de f", "abc"),
    ("punctuation counts as part of a word", "Hi, ok. no! be so", "Hi, ok. no!"),
    ("punctuation alone can make a word", "... ok", "..."),
    (
        "whitespace of any kind separates words",
        "alpha\tbeta\ngamma  delta",
        "alpha beta gamma delta",
    ),
    ("unicode words count characters, not bytes", "Grüße an 日本語 über é", "Grüße 日本語 über"),
    ("emoji count as characters", "🙂🙂🙂 🙂🙂 hello", "🙂🙂🙂 hello"),
    ("exactly 40 characters stay whole", "a" * 40, "a" * 40),
    ("41 characters are cut to 40", "a" * 41, "a" * 40),
    (
        "five words joining to exactly 40 characters stay whole",
        "abcdefg abcdefg abcdefg abcdefg abcdefgh",
        "abcdefg abcdefg abcdefg abcdefg abcdefgh",
    ),
    (
        "five words joining to 41 characters lose the last one",
        "abcdefg abcdefg abcdefg abcdefg abcdefghi",
        "abcdefg abcdefg abcdefg abcdefg abcdefgh",
    ),
    (
        "the cut is by characters, even inside a word",
        "internationalization considerations everywhere",
        "internationalization considerations ever",
    ),
]


@pytest.mark.parametrize(
    ("message", "expected"),
    [pytest.param(message, expected, id=name) for name, message, expected in TITLE_CASES],
)
def test_auto_title_from_the_first_user_message(message: str, expected: str) -> None:
    seen = auto_title(message)
    assert seen == expected, f"message {message!r}: expected {expected!r}, saw {seen!r}"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_auto_title_is_at_most_40_characters_of_long_words(message: str) -> None:
    title = auto_title(message)
    assert len(title) <= 40, f"title {title!r} is {len(title)} characters"
    words = [w for w in message.split() if len(w) > 2][:5]
    expected = " ".join(words)[:40]
    assert title == expected, f"message {message!r}: expected {expected!r}, saw {title!r}"


@pytest.mark.parametrize(
    ("title", "expected"),
    [
        ("", True),
        ("New Chat", True),
        ("new chat", False),
        # spaces around it are none of the title (the edge trims them since; logs
        # written before can hold them)
        ("New Chat ", True),
        ("   ", True),
        ("Key rotation", False),
    ],
)
def test_only_an_empty_or_new_chat_title_needs_a_title(title: str, expected: bool) -> None:
    seen = needs_title(title)
    assert seen is expected, f"needs_title({title!r}): expected {expected}, saw {seen}"
