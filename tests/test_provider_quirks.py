"""Servers' quirks, replayed through a real turn: the worker, the log, the events.

Each test makes the model double (tests/conftest.py `Recorder`) answer as a given
server does, from a recording (tests/data/openai-stream/SOURCES.md) or, where no
recording exists, from chunks shaped as the public report cited beside them, and
checks what the turn wrote to the log and what the worker sent next.
"""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import RECORDED_REPLY, Recorder
from tests.sse import SseClient
from tests.test_model_stream import DEEPSEEK_TOOL_CALL, transcript_bytes, transcript_chunks

MISTRAL_REASONING = "vercel-ai__mistral-reasoning.chunks.jsonl"


def sse(*chunks: dict[str, Any], done: bool = True) -> bytes:
    body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    return body + (b"data: [DONE]\n\n" if done else b"")


def delta(piece: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": piece, "finish_reason": finish}],
        **extra,
    }


async def turn_log(api: SseClient, cid: str) -> list[dict[str, Any]]:
    status, log = await api.request("GET", f"/v1/conversations/{cid}/log")
    assert status == 200, log
    return [json.loads(line) for line in str(log).splitlines() if line.strip()]


def of_type(log: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [event for event in log if event["type"] == kind]


def recorded_usage(raw: bytes) -> tuple[int, int]:
    lines = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: {")]
    usage = [json.loads(line)["usage"] for line in lines if b'"usage":{' in line]
    return usage[-1]["prompt_tokens"], usage[-1]["completion_tokens"]


async def _answered(
    api: SseClient, recording: Recorder, prompt: str, *replies: bytes
) -> tuple[str, int]:
    """A new conversation whose `prompt` the recorder answers with `replies`, one a model
    call, streamed to its end (`ok`): its id, and the requests the recorder had before."""
    recording.script(prompt, *replies)
    cid = (await api.create_conversation(model="recorder"))["id"]
    before = len(recording.requests)
    events = await api.send_stream(cid, prompt)
    assert events[-1].data == "ok", events[-3:]
    return cid, before


async def test_deepseek_thinking_goes_back_with_its_tool_calls(
    api: SseClient, recorder: tuple[Recorder, str]
) -> None:
    # DeepSeek's thinking mode answers 400 "The reasoning_content in the thinking mode
    # must be passed back to the API" to a tool round whose assistant message lacks it.
    recording, _ = recorder
    first, second = transcript_bytes(DEEPSEEK_TOOL_CALL), RECORDED_REPLY.read_bytes()
    cid, before = await _answered(api, recording, "weather in SF, deepseek", first, second)

    chunks = transcript_chunks(DEEPSEEK_TOOL_CALL)
    thinking = "".join(
        c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks if c["choices"]
    )
    call_id = next(
        c["choices"][0]["delta"]["tool_calls"][0]["id"]
        for c in chunks
        if c["choices"] and c["choices"][0]["delta"].get("tool_calls")
    )
    sent = recording.requests[before + 1]["messages"]
    assistant = next(m for m in sent if m.get("tool_calls"))
    assert assistant["reasoning_content"] == thinking and thinking
    assert [c["id"] for c in assistant["tool_calls"]] == [call_id]
    assert "extra_content" not in assistant["tool_calls"][0]

    log = await turn_log(api, cid)
    assert [e["call_id"] for e in of_type(log, "tool_call")] == [call_id]
    assert [e["call_id"] for e in of_type(log, "tool_result")] == [call_id]
    done = of_type(log, "done")[-1]
    assert [b["role"] for b in done["content"]] == ["thinking", "assistant"], done["content"]
    ins, outs = zip(recorded_usage(first), recorded_usage(second), strict=True)
    assert (done["input_tokens"], done["output_tokens"]) == (sum(ins), sum(outs))
    assert done["tokens_estimated"] is False


# Gemini's OpenAI endpoint, as measured in THU-MAIC/OpenMAIC#1556 (Gemini 3): the call
# comes whole, without `index`, with its thought signature in `extra_content`; the
# response ends with finish_reason "stop" (open-webui/computer#224). Gemini 3 answers
# 400 "Function call is missing a thought_signature in functionCall parts" to a next
# request whose call lacks it.
GEMINI_SIGNATURE = {"google": {"thought_signature": "CiQBjz1rX1ZQ"}}
GEMINI_TOOL_CALL = sse(
    delta(
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "extra_content": GEMINI_SIGNATURE,
                    "function": {"arguments": '{"expression":"6*7"}', "name": "calculator"},
                    "id": "call_297140",
                    "type": "function",
                }
            ],
        },
        model="gemini-3-flash",
    ),
    delta(
        {},
        "stop",
        usage={"completion_tokens": 12, "prompt_tokens": 90, "total_tokens": 102},
    ),
)


async def test_gemini_thought_signatures_go_back_with_their_calls(
    api: SseClient, recorder: tuple[Recorder, str]
) -> None:
    recording, _ = recorder
    cid, before = await _answered(
        api, recording, "six times seven, gemini", GEMINI_TOOL_CALL, RECORDED_REPLY.read_bytes()
    )

    sent = recording.requests[before + 1]["messages"]
    assistant = next(m for m in sent if m.get("tool_calls"))
    assert assistant["tool_calls"] == [
        {
            "id": "call_297140",
            "type": "function",
            "function": {"name": "calculator", "arguments": '{"expression":"6*7"}'},
            "extra_content": GEMINI_SIGNATURE,
        }
    ]
    assert "reasoning_content" not in assistant, "no thinking was streamed in that field"
    log = await turn_log(api, cid)
    assert [(e["call_id"], e["result"]) for e in of_type(log, "tool_result")] == [
        ("call_297140", "42")
    ]


# Ollama's OpenAI endpoint gives every call of a response `index` 0, each call whole in
# a chunk of its own with its own id (ollama/ollama#15457; vercel/ai#14277 saw it with
# Ollama 0.20.2 and 0.20.4). Read by index, the two calls were one, its arguments
# '{"expression":"1+1"}{"expression":"2+2"}'.
OLLAMA_TWO_CALLS = sse(
    *(
        delta(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": call_id,
                        "index": 0,
                        "type": "function",
                        "function": {"name": "calculator", "arguments": arguments},
                    }
                ],
            },
            model="qwen2.5-coder:7b",
        )
        for call_id, arguments in (
            ("call_7rgjwzqo", '{"expression":"1+1"}'),
            ("call_9w1lb4ty", '{"expression":"2+2"}'),
        )
    ),
    delta({"role": "assistant", "content": ""}, "tool_calls"),
)


async def test_ollamas_calls_that_share_index_0_are_two_calls(
    api: SseClient, recorder: tuple[Recorder, str]
) -> None:
    recording, _ = recorder
    cid, before = await _answered(
        api, recording, "two sums, ollama", OLLAMA_TWO_CALLS, RECORDED_REPLY.read_bytes()
    )

    log = await turn_log(api, cid)
    assert [(e["call_id"], e["arguments"]) for e in of_type(log, "tool_call")] == [
        ("call_7rgjwzqo", '{"expression":"1+1"}'),
        ("call_9w1lb4ty", '{"expression":"2+2"}'),
    ]
    results = {e["call_id"]: (e["result"], e["error"]) for e in of_type(log, "tool_result")}
    assert results == {"call_7rgjwzqo": ("2", None), "call_9w1lb4ty": ("4", None)}
    sent = recording.requests[before + 1]["messages"]
    assert [m["tool_call_id"] for m in sent if m["role"] == "tool"] == [
        "call_7rgjwzqo",
        "call_9w1lb4ty",
    ]


async def test_magistrals_thinking_parts_are_thinking_and_its_text_parts_the_answer(
    api: SseClient, recorder: tuple[Recorder, str]
) -> None:
    # Mistral's reasoning models stream content as parts, the thinking in parts of type
    # "thinking" (a recording of magistral-medium-2507): they were dropped unread.
    recording, _ = recorder
    raw = transcript_bytes(MISTRAL_REASONING)
    cid, _ = await _answered(api, recording, "two plus two, magistral", raw)

    parts = [
        part
        for chunk in transcript_chunks(MISTRAL_REASONING)
        for part in chunk["choices"][0]["delta"]["content"] or []
    ]
    thinking = "".join(p["text"] for t in parts if t["type"] == "thinking" for p in t["thinking"])
    answer = "".join(p["text"] for p in parts if p["type"] == "text")
    done = of_type(await turn_log(api, cid), "done")[-1]
    assert done["content"] == [
        {"role": "thinking", "content": thinking.strip()},
        {"role": "assistant", "content": answer},
    ]
    assert (done["input_tokens"], done["output_tokens"]) == recorded_usage(raw)


# A proxy or an older local server that ignores `stream: true` answers one
# `chat.completion` object as application/json (litellm and vercel/ai read it as a
# one-chunk stream): the turn failed `model_error`. Shaped as OpenAI's non-streamed
# answer, with DeepSeek's `reasoning_content` and vLLM's `reasoning` fields.
WHOLE_TOOL_CALL = {
    "id": "chatcmpl-whole-1",
    "object": "chat.completion",
    "model": "qwen3-8b",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "reasoning_content": "Six times seven: the calculator will do.",
                "tool_calls": [
                    {
                        "id": "call_whole_1",
                        "type": "function",
                        "function": {"name": "calculator", "arguments": '{"expression":"6*7"}'},
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 90, "completion_tokens": 21, "total_tokens": 111},
}
WHOLE_ANSWER = {
    "id": "chatcmpl-whole-2",
    "object": "chat.completion",
    "model": "qwen3-8b",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "<think>It said 42.</think>Six times seven is 42.",
            },
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 130, "completion_tokens": 12, "total_tokens": 142},
}


async def test_a_whole_json_answer_is_read_as_one_chunk_its_calls_run_its_usage_counted(
    api: SseClient, recorder: tuple[Recorder, str]
) -> None:
    recording, _ = recorder
    first, second = (json.dumps(body).encode() for body in (WHOLE_TOOL_CALL, WHOLE_ANSWER))
    cid, before = await _answered(api, recording, "six times seven, no stream", first, second)

    log = await turn_log(api, cid)
    assert [(e["call_id"], e["result"]) for e in of_type(log, "tool_result")] == [
        ("call_whole_1", "42")
    ]
    sent = recording.requests[before + 1]["messages"]
    assistant = next(m for m in sent if m.get("tool_calls"))
    assert assistant["reasoning_content"] == "Six times seven: the calculator will do."
    assert [c["id"] for c in assistant["tool_calls"]] == ["call_whole_1"]
    done = of_type(log, "done")[-1]
    # the tool call between the two answers keeps their thinking apart
    assert done["content"] == [
        {"role": "thinking", "content": "Six times seven: the calculator will do."},
        {"role": "thinking", "content": "It said 42."},
        {"role": "assistant", "content": "Six times seven is 42."},
    ], done["content"]
    assert (done["input_tokens"], done["output_tokens"]) == (90 + 130, 21 + 12)
    assert done["tokens_estimated"] is False


async def test_a_json_error_body_with_status_200_still_fails_the_turn(
    api: SseClient, recorder: tuple[Recorder, str]
) -> None:
    recording, _ = recorder
    prompt = "quota gone, no stream"
    error = {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota"}}
    recording.script(prompt, json.dumps(error).encode())
    cid = (await api.create_conversation(model="recorder"))["id"]
    events = await api.send_stream(cid, prompt)
    assert [e.event for e in events][-2:] == ["error", "done"], events[-3:]
    assert events[-2].raw["code"] == "model_error", events[-2].raw
    assert "You exceeded your current quota" in events[-2].data


# llama.cpp's server before tools/server sends a failure mid-stream as the line
# `error: {"code":..,"message":..,"type":..}` (server_sent_event(sink, "error", ...)),
# then `data: [DONE]`: read as plain SSE, the turn ended `done` with a cut answer.
LLAMA_CPP_MID_STREAM_ERROR = (
    sse(delta({"role": "assistant", "content": "The answer is"}), done=False)
    + b'error: {"code":500,"message":"Input prompt is too big compared to KV size.",'
    + b'"type":"server_error"}\n\n'
    + b"data: [DONE]\n\n"
)


async def test_llama_cpps_error_line_fails_the_turn_with_the_servers_message(
    api: SseClient, recorder: tuple[Recorder, str]
) -> None:
    recording, _ = recorder
    prompt = "a prompt too big, llama.cpp"
    recording.script(prompt, LLAMA_CPP_MID_STREAM_ERROR)
    cid = (await api.create_conversation(model="recorder"))["id"]
    events = await api.send_stream(cid, prompt)

    assert [e.event for e in events][-2:] == ["error", "done"], events[-3:]
    assert events[-2].raw["code"] == "model_error", events[-2].raw
    assert "Input prompt is too big compared to KV size." in events[-2].data, events[-2].data
    log = await turn_log(api, cid)
    assert not of_type(log, "done")
    failed = of_type(log, "failed")[-1]
    assert failed["code"] == "model_error"
    assert failed["content"] == [{"role": "assistant", "content": "The answer is"}]
