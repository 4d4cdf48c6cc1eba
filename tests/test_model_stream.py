"""The pure Chat Completions stream parser, against real recorded transcripts.

Expected values are computed here from the fixture JSON with the standard
library (concatenating delta fields), independently of the parser, so a parser
bug cannot hide in a copied expectation. No network: see test_model_client.py
for the same transcripts over real HTTP.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.errors import ModelStreamError
from actors.model_stream import (
    ChatStreamParser,
    Finish,
    StreamItem,
    TextDelta,
    ToolCallRequest,
    Usage,
)

# Recorded third-party transcripts, byte-for-byte copies of the team's shared
# fixtures (tests/data/openai-stream/SOURCES.md says where each comes from).
FIXTURE_DIR = Path(__file__).parent / "data" / "openai-stream"
TEXT_WITH_USAGE = "openai-python__e2aad469b71d_text-with-usage.sse"
DEEPSEEK_REASONING = "vercel-ai__deepseek-reasoning.chunks.jsonl"
DEEPSEEK_TOOL_CALL = "vercel-ai__deepseek-tool-call.chunks.jsonl"
TRANSCRIPTS = (TEXT_WITH_USAGE, DEEPSEEK_REASONING, DEEPSEEK_TOOL_CALL)


def transcript_bytes(name: str) -> bytes:
    """The transcript as a server sends it; JSON-lines files framed as DeepSeek's API does."""
    path = FIXTURE_DIR / name
    assert path.is_file(), f"expected the recorded transcript at {path}"
    raw = path.read_bytes()
    if name.endswith(".sse"):
        return raw
    lines = [line for line in raw.splitlines() if line.strip()]
    return b"".join(b"data: " + line + b"\n\n" for line in lines) + b"data: [DONE]\n\n"


def transcript_chunks(name: str) -> list[dict[str, Any]]:
    """The transcript's chunk objects, read with the standard library."""
    chunks = []
    for line in transcript_bytes(name).split(b"\n"):
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            chunks.append(json.loads(line[len(b"data: ") :]))
    return chunks


class Expected(msgspec.Struct):
    texts: list[TextDelta]
    tail: list[StreamItem]  # tool calls, finish, usage: in the order they must come
    deltas: int


def expected_items(chunks: list[dict[str, Any]]) -> Expected:
    texts: list[TextDelta] = []
    calls: dict[int, dict[str, str]] = {}
    finish: str | None = None
    usage: dict[str, Any] | None = None
    reasoning_content: list[str] = []
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                reasoning_content.append(delta["reasoning_content"])
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                texts.append(TextDelta("thinking", reasoning))
            if delta.get("content"):
                texts.append(TextDelta("answer", delta["content"]))
            for piece in delta.get("tool_calls") or []:
                call = calls.setdefault(piece["index"], {"id": "", "name": "", "arguments": ""})
                call["id"] = call["id"] or piece.get("id", "")
                function = piece.get("function") or {}
                call["name"] = call["name"] or function.get("name", "")
                call["arguments"] += function.get("arguments") or ""
            finish = choice.get("finish_reason") or finish
        usage = chunk.get("usage") or usage
    assert finish is not None, "every recorded transcript ends with a finish_reason"
    tail: list[StreamItem] = [
        ToolCallRequest(call["id"], call["name"], call["arguments"])
        for _, call in sorted(calls.items())
    ]
    tail.append(Finish(finish, "".join(reasoning_content) or None))
    if usage is not None:
        tail.append(Usage(usage["prompt_tokens"], usage["completion_tokens"]))
    return Expected(texts=texts, tail=tail, deltas=len(texts))


def parse(pieces: list[bytes]) -> tuple[list[StreamItem], ChatStreamParser]:
    parser = ChatStreamParser()
    items: list[StreamItem] = []
    for piece in pieces:
        items += parser.feed(piece)
    items += parser.finish()
    return items, parser


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def merged(items: list[StreamItem]) -> list[tuple[str, str]]:
    """Consecutive text of one kind joined: what a reader sees, whatever the chunking."""
    out: list[tuple[str, str]] = []
    for item in items:
        if isinstance(item, TextDelta):
            if out and out[-1][0] == item.kind:
                out[-1] = (item.kind, out[-1][1] + item.text)
            else:
                out.append((item.kind, item.text))
    return out


def sse(*chunks: dict[str, Any] | str) -> bytes:
    """An SSE body: dicts become `data: <json>`, strings are written as they are."""
    return b"".join(
        (b"data: " + json.dumps(c).encode() + b"\n\n") if isinstance(c, dict) else c.encode()
        for c in chunks
    )


def delta(finish_reason: str | None = None, **fields: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": fields, "finish_reason": finish_reason}],
    }


def stop() -> dict[str, Any]:
    return delta("stop")


DONE = "data: [DONE]\n\n"


# ------------------------------------------------------------ recorded transcripts


@pytest.mark.parametrize("name", TRANSCRIPTS)
def test_recorded_transcript_yields_its_text_tool_calls_finish_and_usage(name: str) -> None:
    expected = expected_items(transcript_chunks(name))
    items, parser = parse([transcript_bytes(name)])

    texts = [i for i in items if isinstance(i, TextDelta)]
    others = [i for i in items if not isinstance(i, TextDelta)]
    assert texts == expected.texts
    assert others == expected.tail
    # Text first, then the closing items: nothing of the answer comes after Finish.
    assert items == [*texts, *others]
    assert parser.done
    assert parser.deltas == expected.deltas


def test_recorded_transcripts_hold_what_their_sources_describe() -> None:
    # A guard on the fixtures themselves (figures from SOURCES.md), so the
    # independent expectation above cannot drift to something trivial.
    assert expected_items(transcript_chunks(TEXT_WITH_USAGE)).tail[-1] == Usage(14, 30)
    reasoning = expected_items(transcript_chunks(DEEPSEEK_REASONING))
    kinds = [t.kind for t in reasoning.texts]
    assert kinds == sorted(kinds, key=lambda k: k != "thinking") and "answer" in kinds
    tool = expected_items(transcript_chunks(DEEPSEEK_TOOL_CALL)).tail[0]
    assert isinstance(tool, ToolCallRequest) and tool.name == "weather"
    assert json.loads(tool.arguments) == {"location": "San Francisco"}


@pytest.mark.parametrize("name", TRANSCRIPTS)
def test_recorded_transcript_fed_one_byte_at_a_time_gives_the_same_items(name: str) -> None:
    data = transcript_bytes(name)
    whole, _ = parse([data])
    bytewise, _ = parse([data[i : i + 1] for i in range(len(data))])
    assert bytewise == whole


LINE_ENDINGS = {
    "lf": lambda b: b,
    "crlf": lambda b: b.replace(b"\n", b"\r\n"),
    "cr": lambda b: b.replace(b"\n", b"\r"),
}


@pytest.mark.parametrize("ending", sorted(LINE_ENDINGS))
@pytest.mark.parametrize("name", TRANSCRIPTS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_recorded_transcript_split_anywhere_with_any_line_ending_gives_the_same_items(
    name: str, ending: str, data: st.DataObject
) -> None:
    reference, _ = parse([transcript_bytes(name)])
    body = LINE_ENDINGS[ending](transcript_bytes(name))
    cuts = data.draw(st.lists(st.integers(1, len(body) - 1), max_size=60), label="cuts")
    items, parser = parse(split_at(body, cuts))
    assert items == reference
    assert parser.done


def test_multibyte_characters_split_mid_character_survive_intact() -> None:
    thinking = "Überlegung: 日本語 und 🙂 — naïve"
    answer = "Réponse: ça marche 👍🏽, 中文也行"
    body = sse(
        delta(reasoning_content=thinking[:9]),
        delta(reasoning_content=thinking[9:]),
        delta(content=answer[:12]),
        delta(content=answer[12:]),
        stop(),
        DONE,
    )
    for cut in range(1, len(body)):
        items, _ = parse([body[:cut], body[cut:]])
        assert merged(items) == [("thinking", thinking), ("answer", answer)], f"cut at byte {cut}"


# ------------------------------------------------------------ thinking in <think> tags

TAGGED = "Intro <think>deep thought</think> the answer"
TAGGED_AS_READ = [("answer", "Intro "), ("thinking", "deep thought"), ("answer", " the answer")]


def test_think_tags_cut_at_every_pair_of_points_split_thinking_from_answer() -> None:
    for i in range(len(TAGGED) + 1):
        for j in range(i, len(TAGGED) + 1):
            pieces = [p for p in (TAGGED[:i], TAGGED[i:j], TAGGED[j:]) if p]
            body = sse(*[delta(content=p) for p in pieces], stop(), DONE)
            items, _ = parse([body])
            assert merged(items) == TAGGED_AS_READ, f"content cut at {i} and {j}: {pieces}"
            assert items[-1] == Finish("stop")


@pytest.mark.parametrize(
    ("pieces", "as_read"),
    [
        (["a <thing> b"], [("answer", "a <thing> b")]),
        (["x <", " y"], [("answer", "x < y")]),
        (["see <thi"], [("answer", "see <thi")]),  # a tag prefix at the end is text
        (["<think>still thinking</thi"], [("thinking", "still thinking</thi")]),
        (
            ["<think>a</think>b<think>c</think>d"],
            [("thinking", "a"), ("answer", "b"), ("thinking", "c"), ("answer", "d")],
        ),
        (["<think>", "</think>", "only answer"], [("answer", "only answer")]),
        (["<<thi", "nk>>"], [("answer", "<"), ("thinking", ">")]),
    ],
)
def test_text_that_only_looks_like_a_tag_is_kept_as_text(
    pieces: list[str], as_read: list[tuple[str, str]]
) -> None:
    items, _ = parse([sse(*[delta(content=p) for p in pieces], stop(), DONE)])
    assert merged(items) == as_read


def test_partial_tag_held_at_a_cut_is_returned_before_the_error() -> None:
    parser = ChatStreamParser()
    seen = parser.feed(sse(delta(content="almost <thi")))
    assert merged(seen) == [("answer", "almost ")]
    held = parser.finish()  # the text is not lost to the error that follows
    assert merged(held) == [("answer", "<thi")]
    with pytest.raises(ModelStreamError) as info:
        parser.finish()
    assert info.value.code == "stream_cut"


# ------------------------------------------------------------ what is ignored, what counts


def test_comments_fields_keepalives_roles_and_empty_deltas_yield_nothing() -> None:
    plain = sse(delta(content="Hi"), delta(content=" there"), stop(), DONE)
    noisy = sse(
        ": ping\n\n",
        "event: message\nid: 1\nretry: 3000\n",
        delta(role="assistant", content="", refusal=None),
        "\n\n\n",
        delta(content=None, reasoning_content=None),
        delta(),
        delta(content="Hi"),
        ": keep-alive\n",
        delta(content=" there"),
        {"id": "x", "choices": [{"index": 0, "delta": None, "finish_reason": None}]},
        stop(),
        DONE,
    )
    items, parser = parse([noisy])
    assert items == parse([plain])[0]
    assert parser.deltas == 2


def test_reasoning_field_is_thinking_and_a_duplicate_under_both_names_counts_once() -> None:
    body = sse(
        delta(reasoning="one "),
        delta(reasoning_content="two ", reasoning="two "),
        delta(content="three"),
        stop(),
        DONE,
    )
    items, parser = parse([body])
    assert merged(items) == [("thinking", "one two "), ("answer", "three")]
    assert parser.deltas == 3


def test_parallel_tool_calls_are_assembled_by_index_and_emitted_at_finish_in_order() -> None:
    def piece(index: int, **fields: Any) -> dict[str, Any]:
        return delta(tool_calls=[{"index": index, **fields}])

    pieces = sse(
        piece(1, id="call_b", type="function", function={"name": "calculator", "arguments": ""}),
        piece(0, id="call_a", type="function", function={"name": "get_current_time"}),
        piece(1, function={"arguments": '{"expression": '}),
        piece(0, function={"arguments": "{"}),
        piece(0, function={"name": "get_current_time", "arguments": "}"}),  # name repeated
        piece(1, function={"arguments": '"1+1"}'}),
    )
    parser = ChatStreamParser()
    assert parser.feed(pieces) == [], "tool calls wait for the finish_reason"
    items = parser.feed(sse(delta("tool_calls"), DONE)) + parser.finish()
    assert items == [
        ToolCallRequest("call_a", "get_current_time", "{}"),
        ToolCallRequest("call_b", "calculator", '{"expression": "1+1"}'),
        Finish("tool_calls"),
    ]


def test_tool_calls_without_a_finish_reason_are_emitted_at_done() -> None:
    body = sse(
        delta(tool_calls=[{"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{}"}}]),
        DONE,
    )
    items, _ = parse([body])
    assert items == [ToolCallRequest("c1", "f", "{}"), Finish("tool_calls")]


def test_usage_on_a_later_empty_choices_chunk_comes_after_finish() -> None:
    usage_chunk = {"id": "x", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}
    items, _ = parse([sse(delta(content="ok"), stop(), usage_chunk, DONE)])
    assert items == [TextDelta("answer", "ok"), Finish("stop"), Usage(7, 2)]


def test_a_negative_or_odd_usage_counts_no_tokens_never_fewer_than_none() -> None:
    """A provider's usage of -5 tokens was taken as it was: a negative cost, billed
    as credits given to the account, and a conversation's token total lowered."""
    odd = {"prompt_tokens": -5, "completion_tokens": "12"}
    items, _ = parse([sse(delta(content="ok"), stop(), {"choices": [], "usage": odd}, DONE)])
    assert items[-1] == Usage(0, 0), items


def test_finish_reason_without_done_ends_normally() -> None:
    items, parser = parse([sse(delta(content="ok"), delta("length"))])
    assert items == [TextDelta("answer", "ok"), Finish("length")]
    assert not parser.done


def test_done_on_the_last_line_without_a_newline_is_accepted() -> None:
    items, parser = parse([sse(delta(content="ok")) + b"data: [DONE]"])
    assert items == [TextDelta("answer", "ok"), Finish("stop")]
    assert parser.done


def test_bytes_after_done_are_ignored() -> None:
    items, _ = parse([sse(delta(content="ok"), stop(), DONE, delta(content="late"), "data: {bad")])
    assert items == [TextDelta("answer", "ok"), Finish("stop")]


def test_several_json_chunks_in_one_event_are_each_read() -> None:
    # Some servers omit the blank line between data lines.
    body = (
        b"data: " + json.dumps(delta(content="a")).encode() + b"\n"
        b"data: " + json.dumps(delta(content="b")).encode() + b"\n\n" + sse(stop(), DONE)
    )
    items, _ = parse([body])
    assert merged(items) == [("answer", "ab")]


# ------------------------------------------------------------ errors

ERROR_SHAPES: dict[str, tuple[dict[str, Any], str]] = {
    "openai_error_object": (
        {"error": {"message": "The server had an error", "type": "server_error"}},
        "The server had an error",
    ),
    "sglang_error_object": (
        {"error": {"message": "context length exceeded", "type": "BadRequestError", "code": 400}},
        "context length exceeded",
    ),
    "vllm_object_error": (
        {
            "object": "error",
            "message": "The model is overloaded",
            "type": "ServiceUnavailable",
            "code": 503,
        },
        "The model is overloaded",
    ),
    "openrouter_error_with_finish_reason": (
        {
            "id": "gen-1",
            "object": "chat.completion.chunk",
            "error": {"code": 502, "message": "Provider disconnected"},
            "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
        },
        "Provider disconnected",
    ),
    "finish_reason_error_alone": (delta("error"), "finish_reason 'error'"),
    "error_as_a_string": ({"error": "upstream overloaded"}, "upstream overloaded"),
}


@pytest.mark.parametrize("shape", sorted(ERROR_SHAPES))
def test_model_error_shapes_raise_model_error_with_their_message(shape: str) -> None:
    error_chunk, message = ERROR_SHAPES[shape]
    parser = ChatStreamParser()
    assert parser.feed(sse(delta(content="partial"))) == [TextDelta("answer", "partial")]
    with pytest.raises(ModelStreamError) as info:
        parser.feed(sse(error_chunk))
    assert (info.value.code, message in info.value.message) == ("model_error", True), (
        f"expected model_error mentioning {message!r}, saw {info.value.code}: {info.value.message}"
    )
    assert not info.value.retryable


# Errors sent outside a data line, then `[DONE]`. llama.cpp's server (examples/server,
# before the move to tools/server) writes a failure mid-stream with
# `server_sent_event(sink, "error", error_data)`: the line `error: <json>`, and
# `data: [DONE]` after it for the OpenAI routes; the JSON is its
# format_error_response ({"code", "message", "type"}). Others name the event `error`.
LLAMA_CPP_ERROR = (
    'error: {"code":500,"message":"Input prompt is too big compared to KV size.",'
    '"type":"server_error"}\n\n'
)
ERROR_EVENTS = {
    "llama_cpp_error_field": (LLAMA_CPP_ERROR, "Input prompt is too big compared to KV size."),
    "error_event_with_an_error_object": (
        'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
        '"message":"Overloaded"}}\n\n',
        "Overloaded",
    ),
    "error_event_with_a_bare_message": (
        'event: error\ndata: {"message":"context window exceeded"}\n\n',
        "context window exceeded",
    ),
    "error_event_with_text": ("event: error\ndata: slot unavailable\n\n", "slot unavailable"),
}


@pytest.mark.parametrize("shape", sorted(ERROR_EVENTS))
def test_an_error_sent_outside_a_data_line_ends_the_answer_with_its_message(shape: str) -> None:
    event, message = ERROR_EVENTS[shape]
    body = sse(delta(content="partial"), event, DONE)
    for pieces in ([body], [body[i : i + 1] for i in range(len(body))]):
        parser = ChatStreamParser()
        items: list[StreamItem] = []
        with pytest.raises(ModelStreamError) as info:
            for piece in pieces:
                items += parser.feed(piece)
            items += parser.finish()
        assert merged(items) == [("answer", "partial")], items
        assert not any(isinstance(item, Finish) for item in items), "no normal end"
        assert info.value.code == "model_error" and message in info.value.message, info.value


@pytest.mark.parametrize(
    "line",
    ["data: {not json\n\n", 'data: {"choices": [\n\n', "data: [1, 2]\n\n", 'data: "text"\n\n'],
)
def test_unparsable_or_non_object_data_line_raises_bad_json(line: str) -> None:
    parser = ChatStreamParser()
    with pytest.raises(ModelStreamError) as info:
        parser.feed(line.encode())
    assert info.value.code == "bad_json", info.value


def test_text_before_an_error_in_the_same_bytes_is_returned_then_the_error_raised() -> None:
    parser = ChatStreamParser()
    items = parser.feed(sse(delta(content="kept"), {"error": {"message": "boom"}}))
    assert items == [TextDelta("answer", "kept")]
    assert parser.error is not None and parser.error.code == "model_error"
    with pytest.raises(ModelStreamError) as on_feed:
        parser.feed(b"data: more\n\n")
    with pytest.raises(ModelStreamError) as on_finish:
        parser.finish()
    assert on_feed.value is parser.error and on_finish.value is parser.error


@pytest.mark.parametrize(
    "body",
    [
        sse(delta(content="half an answer")),
        sse(delta(content="half")) + b'data: {"choices": [{"index": 0, "del',
        b"",
        sse(": only a comment\n\n"),
    ],
    ids=["no_finish", "cut_mid_line", "empty", "only_comment"],
)
def test_stream_that_ends_without_done_or_finish_reason_raises_stream_cut(body: bytes) -> None:
    parser = ChatStreamParser()
    parser.feed(body)
    with pytest.raises(ModelStreamError) as info:
        parser.finish()
    assert info.value.code == "stream_cut", info.value
    assert info.value.retryable


def test_stream_cut_names_non_sse_text_it_carried() -> None:
    parser = ChatStreamParser()
    parser.feed(b"<html><body>Bad gateway</body></html>\n")
    with pytest.raises(ModelStreamError) as info:
        parser.finish()
    assert info.value.code == "stream_cut"
    assert "Bad gateway" in info.value.message


def test_the_recorded_transcripts_are_the_verbatim_copies_sources_md_names() -> None:
    import hashlib
    import re

    sources = (FIXTURE_DIR / "SOURCES.md").read_text()
    for name in TRANSCRIPTS:
        row = next(line for line in sources.splitlines() if f"`{name}`" in line)
        expected = re.findall(r"\b[0-9a-f]{64}\b", row)[-1]
        seen = hashlib.sha256((FIXTURE_DIR / name).read_bytes()).hexdigest()
        assert seen == expected, f"{name}: sha256 {seen}, SOURCES.md says {expected}"


# ------------------------------------------------------------ the typed path

# Values in every shape servers send, and some they should not: the typed decode
# takes the usual ones (most of what is drawn here), and anything else must fall
# to the rules for all.
_TEXT = st.sampled_from(["", "a", "b", "<think>x", "x</think>", "<thi", "nk>", "Ü🙂"])
_ODD_TEXT = st.one_of(
    st.sampled_from([None, 0, 1]),
    st.lists(
        st.one_of(
            st.fixed_dictionaries({"type": st.just("text"), "text": _TEXT}),
            st.fixed_dictionaries({"type": st.just("image_url")}),
        ),
        max_size=2,
    ),
)
_ANY_TEXT = st.one_of(_TEXT, _TEXT, _TEXT, _ODD_TEXT)
_COUNT = st.sampled_from([None, 0, 7, 12, 3.0, True, "7"])
_TOOL_CALL = st.fixed_dictionaries(
    {"index": st.sampled_from([0, 0, 1, 1, 2, None, True])},
    optional={
        "id": st.sampled_from(["", "call_1", "call_2"]),
        "function": st.fixed_dictionaries(
            {},
            optional={
                "name": st.sampled_from(["", "clock", "clock", 3]),
                "arguments": st.sampled_from(['{"a":', "1}", "", {"a": 1}]),
            },
        ),
    },
)
_DELTA = st.fixed_dictionaries(
    {},
    optional={
        "role": st.just("assistant"),
        "content": _ANY_TEXT,
        "reasoning_content": _ANY_TEXT,
        "reasoning": _ANY_TEXT,
        "tool_calls": st.one_of(st.lists(_TOOL_CALL, max_size=2), st.sampled_from([None, "x"])),
    },
)
_CHOICE = st.fixed_dictionaries(
    {
        "index": st.sampled_from([0, 0, 0, 0, 1, None, True]),
        "delta": st.one_of(_DELTA, _DELTA, _DELTA, st.sampled_from([None, "x"])),
    },
    optional={
        "finish_reason": st.sampled_from(
            [None, None, None, "", "stop", "length", "tool_calls", "error", 1]
        ),
        "logprobs": st.none(),
    },
)
_CHUNK: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {
        "id": st.just("chatcmpl-1"),
        "choices": st.one_of(
            st.lists(_CHOICE, min_size=1, max_size=2),
            st.lists(_CHOICE, min_size=1, max_size=2),
            st.sampled_from([[], None, {}]),
        ),
    },
    optional={
        "object": st.sampled_from(["chat.completion.chunk"] * 5 + ["error"]),
        "usage": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {}, optional={"prompt_tokens": _COUNT, "completion_tokens": _COUNT}
            ),
        ),
        "error": st.sampled_from([None] * 6 + [{"message": "boom"}, "down"]),
        "message": st.just("overloaded"),
    },
)


def _outcome(pieces: list[bytes]) -> tuple[list[StreamItem], str | None, int]:
    parser = ChatStreamParser()
    items: list[StreamItem] = []
    try:
        for piece in pieces:
            items += parser.feed(piece)
            if parser.error is not None:
                break
        else:
            items += parser.finish()
    except ModelStreamError as err:
        return items, f"{err.code}: {err.message}", parser.deltas
    error = parser.error
    return items, None if error is None else f"{error.code}: {error.message}", parser.deltas


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(_CHUNK, min_size=1, max_size=6), done=st.booleans())
def test_events_read_whole_give_what_the_same_bytes_give_read_line_by_line(
    chunks: list[dict[str, Any]], done: bool
) -> None:
    events = [b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks]
    if done:
        events.append(b"data: [DONE]\n\n")
    whole = _outcome(events)  # each read whole events: the typed decode
    # Cut before each event's last byte, no read is whole events: the line reader.
    by_line = _outcome([piece for event in events for piece in (event[:-1], event[-1:])])
    assert whole == by_line


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(_CHUNK, min_size=1, max_size=6),
    done=st.booleans(),
    data=st.data(),
)
def test_reads_cut_at_any_line_end_give_what_a_byte_at_a_time_gives(
    chunks: list[dict[str, Any]], done: bool, data: st.DataObject
) -> None:
    # Servers that write several data lines in one event, or one JSON per line:
    # a read may end after a data line whose event goes on in the next read. What
    # such a read left held must be read before the next one, whole or not.
    body = b""
    for chunk in chunks:
        body += b"data: " + json.dumps(chunk).encode() + b"\n"
        if data.draw(st.booleans(), label="blank line after it"):
            body += b"\n"
    body += b"\n" + (b"data: [DONE]\n\n" if done else b"")
    ends = [i + 1 for i, byte in enumerate(body[:-1]) if byte == ord("\n")]
    cuts = data.draw(st.lists(st.sampled_from(ends), max_size=len(ends)), label="cuts")
    by_reads = _outcome(split_at(body, cuts))
    bytewise = _outcome([body[i : i + 1] for i in range(len(body))])
    assert by_reads == bytewise
