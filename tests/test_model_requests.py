"""What the actor sends to the model: history, tools and settings (DESIGN section 4)."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import RECORDED_REPLY, Recorder
from tests.sse import SseClient

TRANSCRIPT = RECORDED_REPLY


def _chunks() -> list[dict[str, Any]]:
    lines = TRANSCRIPT.read_text().splitlines()
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def _expected_reply() -> str:
    """The answer text the recorded transcript streams, read from the transcript itself."""
    return "".join(
        choice["delta"].get("content") or "" for chunk in _chunks() for choice in chunk["choices"]
    )


def _expected_usage() -> tuple[int, int]:
    usage = next(chunk["usage"] for chunk in _chunks() if chunk.get("usage"))
    return int(usage["prompt_tokens"]), int(usage["completion_tokens"])


async def test_the_model_gets_the_latest_history_personal_prompt_tools_and_settings(
    api: SseClient, recorder: tuple[Recorder, str]
) -> None:
    recording, _ = recorder
    conversation = await api.create_conversation(model="recorder")
    cid = conversation["id"]
    before = len(recording.requests)
    first = await api.send_stream(cid, "first question")
    second = await api.send_stream(cid, "second question")
    assert first[-1].data == "ok" and second[-1].data == "ok"
    requests: list[dict[str, Any]] = recording.requests[before:]
    assert len(requests) == 2
    # the recorder has an endpoint of its own and no key: the main provider's is not sent
    assert recording.keys[before:] == [None, None], recording.keys[before:]

    reply = _expected_reply()
    assert "".join(e.data for e in first if e.event == "token") == reply
    system = requests[1]["messages"][0]
    assert system["role"] == "system" and "personal" in system["content"]
    assert requests[1]["messages"][1:] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "second question"},
    ]
    body = requests[1]
    assert body["model"] == "gpt-4o-2024-08-06" and body["stream"] is True
    assert body["max_tokens"] == 1234 and body["temperature"] == 0.7
    names = {tool["function"]["name"] for tool in body["tools"]}
    assert {"get_current_time", "calculator"} <= names
    assert not any(n.startswith(("project_", "git_", "repo_")) for n in names)


async def test_usage_reported_by_the_model_is_what_the_turn_records(
    api: SseClient, recorder: tuple[Recorder, str]
) -> None:
    conversation = await api.create_conversation(model="recorder")
    cid = conversation["id"]
    await api.send_stream(cid, "hello")
    status, log = await api.request("GET", f"/v1/conversations/{cid}/log")
    assert status == 200
    done = [json.loads(line) for line in str(log).splitlines() if '"type":"done"' in line]
    assert (done[0]["input_tokens"], done[0]["output_tokens"]) == _expected_usage()
    assert done[0]["tokens_estimated"] is False


async def test_a_model_that_refuses_openais_defaults_is_asked_as_the_models_file_says(
    api: SseClient, recorder: tuple[Recorder, str]
) -> None:
    # OpenAI's reasoning models answer 400 to `max_tokens` ("Use 'max_completion_tokens'
    # instead") and to any temperature but 1; Mistral answers 422 to `stream_options`
    # ("Extra inputs are not permitted"). The models file says so, and the body obeys.
    recording, _ = recorder
    conversation = await api.create_conversation(model="recorder-strict")
    before = len(recording.requests)
    events = await api.send_stream(conversation["id"], "hello")
    assert events[-1].data == "ok", events[-3:]
    body = recording.requests[before]
    assert body["model"] == "o3" and body["stream"] is True
    assert body["max_completion_tokens"] == 321 and "max_tokens" not in body, body
    assert body["temperature"] == 1.0, body
    assert "stream_options" not in body, body
    status, log = await api.request("GET", f"/v1/conversations/{conversation['id']}/log")
    assert status == 200
    started = [json.loads(line) for line in str(log).splitlines() if '"type":"started"' in line]
    assert started[0]["temperature"] == 1.0 and started[0]["max_tokens"] == 321, started


# A tool round with no text, as Gemini's OpenAI endpoint streams one: the call whole,
# then finish_reason "stop" (tests/test_provider_quirks.py has its source).
CALL_WITHOUT_TEXT = (
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","tool_calls":[{"id":'
    b'"call_no_text","type":"function","function":{"name":"calculator","arguments":'
    b'"{\\"expression\\":\\"2+3\\"}"}}]},"finish_reason":null}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)


async def test_a_tool_round_without_text_sends_the_content_the_models_file_says(
    api: SseClient, recorder: tuple[Recorder, str]
) -> None:
    # OpenAI takes null or "" beside tool calls. xAI answers 400 "Each message must
    # have at least one content element" to null (langchain-ai/langchain#34140);
    # gateways onto Anthropic or Bedrock answer 400 "text content blocks must be
    # non-empty" to "" (vercel/ai#14612). The default stays null; the models file
    # gives an endpoint that refuses it "".
    recording, _ = recorder
    sent: dict[str, Any] = {}
    for model in ("recorder", "recorder-strict"):
        prompt = f"two plus three, on {model}"
        recording.script(prompt, CALL_WITHOUT_TEXT, TRANSCRIPT.read_bytes())
        conversation = await api.create_conversation(model=model)
        before = len(recording.requests)
        events = await api.send_stream(conversation["id"], prompt)
        assert events[-1].data == "ok", events[-3:]
        messages = recording.requests[before + 1]["messages"]
        sent[model] = next(m for m in messages if m.get("tool_calls"))
    assert [c["id"] for c in sent["recorder-strict"]["tool_calls"]] == ["call_no_text"]
    assert {model: m["content"] for model, m in sent.items()} == {
        "recorder": None,
        "recorder-strict": "",
    }
