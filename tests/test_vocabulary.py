"""Old logs keep decoding: a frozen sample of every event, as first written.

`tests/data/events_v1.jsonl` was written once by `events.codec.encode` and is
never regenerated: if a change to `events/vocabulary.py` breaks any of its
lines, the change breaks stored logs too. A new event type needs a new line
(the coverage test below fails until it has one); existing lines never change.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import msgspec
import pytest

from events.codec import decode_command, decode_event, encode, encode_stored
from events.vocabulary import (
    AnyEvent,
    Chunk,
    ContentBlock,
    Done,
    Prices,
    SendMessage,
    Started,
    ToolResult,
    UserMessage,
    event_type,
)

SAMPLES = Path(__file__).parent / "data" / "events_v1.jsonl"


def sample_lines() -> list[bytes]:
    assert SAMPLES.is_file(), f"expected the frozen samples at {SAMPLES}"
    return [line for line in SAMPLES.read_bytes().splitlines() if line.strip()]


def sample_of(type_name: str) -> dict[str, Any]:
    for line in sample_lines():
        fields: dict[str, Any] = json.loads(line)
        if fields["type"] == type_name:
            return fields
    raise AssertionError(f"no sample of {type_name!r} in {SAMPLES}")


def tag_of(cls: type[Any]) -> str:
    return str(cls.__struct_config__.tag)


@pytest.mark.parametrize("line", sample_lines(), ids=lambda line: json.loads(line)["type"])
def test_every_frozen_sample_still_decodes_and_round_trips(line: bytes) -> None:
    event = decode_event(line)
    expected_type = json.loads(line)["type"]
    assert event_type(event) == expected_type, (
        f"expected a {expected_type!r} event, saw {event_type(event)!r}"
    )
    again = decode_event(encode(event))
    assert again == event, f"re-encoding changed the event:\nbefore {event!r}\nafter  {again!r}"


@pytest.mark.parametrize("line", sample_lines(), ids=lambda line: json.loads(line)["type"])
def test_every_field_of_a_sample_is_read_not_skipped(line: bytes) -> None:
    # a renamed field would decode silently (unknown keys are skipped) and take
    # its default: the decoded event must hold every value the sample holds
    written: dict[str, Any] = json.loads(line)
    event = decode_event(line)
    decoded = msgspec.to_builtins(event)
    assert {k: decoded.get(k) for k in written} == written, (
        f"expected {written!r}\nsaw      {decoded!r}"
    )
    assert_only_later_fields_added(event, written)


def assert_only_later_fields_added(event: Any, written: dict[str, Any]) -> None:
    """Fields the sample does not hold were added after it: they must take their defaults."""
    defaults = {
        field.encode_name: field.default
        if field.default is not msgspec.NODEFAULT
        else field.default_factory()
        for field in msgspec.structs.fields(type(event))
        if field.default is not msgspec.NODEFAULT or field.default_factory is not msgspec.NODEFAULT
    }
    for key, value in msgspec.to_builtins(event).items():
        if key in written or key == "type":
            continue
        assert key in defaults, f"{key!r} is required but the sample lacks it"
        assert value == msgspec.to_builtins(defaults[key]), (
            f"{key!r}, added after the sample, expected its default {defaults[key]!r}, saw {value!r}"
        )


def test_every_event_type_has_a_frozen_sample() -> None:
    members = {tag_of(cls) for cls in typing.get_args(AnyEvent)}
    sampled = [json.loads(line)["type"] for line in sample_lines()]
    missing = members - set(sampled)
    assert not missing, f"no frozen sample for {sorted(missing)}: add one line per new event type"
    unknown = set(sampled) - members
    assert not unknown, f"samples of types no longer in AnyEvent: {sorted(unknown)}"
    assert len(sampled) == len(set(sampled)), f"expected one sample per type, saw {sampled!r}"


def test_an_unknown_field_from_a_newer_writer_is_skipped() -> None:
    fields = sample_of("chunk")
    fields["added_in_v2"] = {"nested": [1, 2, 3]}
    fields["confidence"] = 0.93
    event = decode_event(json.dumps(fields).encode())
    expected = decode_event(json.dumps(sample_of("chunk")).encode())
    assert event == expected, f"expected {expected!r}, saw {event!r}"


@pytest.mark.parametrize(
    ("type_name", "missing", "default"),
    [
        ("tool_result", "duration_ms", 0.0),
        ("user_message", "command_id", ""),
        ("started", "prices", Prices()),
        ("started", "max_tokens", None),
        ("done", "tokens_estimated", False),
        ("chunk", "schema", 1),
    ],
)
def test_a_line_missing_a_field_with_a_default_decodes_to_the_default(
    type_name: str, missing: str, default: object
) -> None:
    fields = sample_of(type_name)
    del fields[missing]
    event = decode_event(json.dumps(fields).encode())
    seen = getattr(event, missing)
    assert seen == default, f"{type_name} without {missing!r}: expected {default!r}, saw {seen!r}"


def test_a_line_missing_a_required_field_is_refused() -> None:
    fields = sample_of("chunk")
    del fields["text"]
    with pytest.raises(msgspec.ValidationError, match="text"):
        decode_event(json.dumps(fields).encode())


def test_an_unknown_event_type_is_refused() -> None:
    fields = sample_of("chunk")
    fields["type"] = "chunk_v9"
    with pytest.raises(msgspec.ValidationError, match="chunk_v9"):
        decode_event(json.dumps(fields).encode())


def test_a_line_without_a_type_is_refused() -> None:
    fields = sample_of("chunk")
    del fields["type"]
    with pytest.raises(msgspec.ValidationError, match="type"):
        decode_event(json.dumps(fields).encode())


def test_a_stored_line_puts_seq_first_and_keeps_the_type() -> None:
    event = Chunk(
        conversation_id="c-1", at=1, event_id="e-1", turn_id="t-1", kind="answer", text="Hi"
    )
    raw = encode_stored(42, event)
    fields: dict[str, Any] = json.loads(raw)
    assert list(fields)[:2] == ["seq", "type"], f"expected seq then type first, saw {list(fields)}"
    assert fields["seq"] == 42 and fields["type"] == "chunk", f"saw {fields!r}"
    # the log line is still an event: a reader that ignores seq decodes it
    assert decode_event(raw) == event, f"expected {event!r} back from {raw!r}"


def test_a_stored_line_of_every_sample_is_the_sample_plus_seq() -> None:
    for seq, line in enumerate(sample_lines(), start=1):
        event = decode_event(line)
        stored: dict[str, Any] = json.loads(encode_stored(seq, event))
        written = json.loads(line)
        expected = {"seq": seq, **written}
        assert {k: stored.get(k) for k in expected} == expected, (
            f"expected {expected!r}\nsaw      {stored!r}"
        )
        assert_only_later_fields_added(event, written)


def test_nested_values_decode_to_their_types() -> None:
    done = decode_event(json.dumps(sample_of("done")).encode())
    assert isinstance(done, Done), f"saw {done!r}"
    assert all(isinstance(block, ContentBlock) for block in done.content), f"saw {done.content!r}"
    started = decode_event(json.dumps(sample_of("started")).encode())
    assert isinstance(started, Started), f"saw {started!r}"
    assert started.prices == Prices(input_price=3.0, output_price=15.0), f"saw {started.prices!r}"


def test_an_invalid_literal_is_refused() -> None:
    fields = sample_of("chunk")
    fields["kind"] = "shouting"
    with pytest.raises(msgspec.ValidationError, match="kind"):
        decode_event(json.dumps(fields).encode())


def test_a_tool_result_without_result_or_error_fields_decodes_as_none() -> None:
    fields = sample_of("tool_result")
    del fields["result"], fields["error"]
    event = decode_event(json.dumps(fields).encode())
    assert isinstance(event, ToolResult), f"saw {event!r}"
    assert (event.result, event.error) == (None, None), f"saw {event!r}"


# ---------------------------------------------------------------- commands

SEND = SendMessage(
    conversation_id="01JH8Q3ZK4M7T2V9X5B6N1R0SD",
    command_id="idem-7f3c2a91",
    user_id="01JH8Q3W2E5F8G1H4J7K0M3N6P",
    at=1_767_225_600_123_456_789,
    message_id="01JH8Q4A1B2C3D4E5F6G7H8J9K",
    content="How do I rotate the API keys?",
    model="demo",
    on_busy="interrupt",
)


def test_a_send_message_command_decodes_from_its_wire_form() -> None:
    raw = (
        b'{"type":"send_message","conversation_id":"01JH8Q3ZK4M7T2V9X5B6N1R0SD",'
        b'"command_id":"idem-7f3c2a91","user_id":"01JH8Q3W2E5F8G1H4J7K0M3N6P",'
        b'"at":1767225600123456789,"message_id":"01JH8Q4A1B2C3D4E5F6G7H8J9K",'
        b'"content":"How do I rotate the API keys?","model":"demo","on_busy":"interrupt"}'
    )
    seen = decode_command(raw)
    assert seen == SEND, f"expected {SEND!r}, saw {seen!r}"
    assert decode_command(encode(SEND)) == SEND, "a command must survive a round trip"


def test_a_command_without_optional_fields_takes_their_defaults() -> None:
    fields = msgspec.to_builtins(SEND)
    del fields["model"], fields["on_busy"]
    seen = decode_command(json.dumps(fields).encode())
    assert isinstance(seen, SendMessage), f"saw {seen!r}"
    assert (seen.model, seen.on_busy) == (None, "reject"), f"saw {seen!r}"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"type": "delete_everything"}, "delete_everything"),
        ({"on_busy": "shout"}, "on_busy"),
        ({"at": "yesterday"}, "at"),
    ],
)
def test_a_malformed_command_is_refused(change: dict[str, Any], needle: str) -> None:
    fields = {**msgspec.to_builtins(SEND), **change}
    with pytest.raises(msgspec.ValidationError, match=needle):
        decode_command(json.dumps(fields).encode())


def test_an_event_is_not_a_command() -> None:
    line = json.dumps(sample_of("user_message")).encode()
    with pytest.raises(msgspec.ValidationError):
        decode_command(line)
    assert isinstance(decode_event(line), UserMessage)


def test_an_event_holding_a_lone_surrogate_encodes_with_a_replacement_character() -> None:
    outside = json.loads('"a\\ud800b"')  # json.loads of outside data can make one
    sample = decode_event(json.dumps(sample_of("tool_result")).encode())
    assert isinstance(sample, ToolResult)
    result = msgspec.structs.replace(sample, result=outside)
    event = decode_event(encode(result))
    assert isinstance(event, ToolResult) and event.result == "a\ufffdb"
    assert msgspec.structs.replace(event, result=outside) == result
