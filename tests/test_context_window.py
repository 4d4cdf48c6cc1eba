"""A history longer than the model's context window: the pure rules, without servers.

What fits (`fit_history`), the room it may take (`history_budget`), the rate
tokens are estimated at (`tokens_per_byte`), and which refusals of a provider
say "too long" (`refused_as_too_long`), each against the real shapes providers
send.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.content import (
    MESSAGE_OVERHEAD_TOKENS,
    SAFE_TOKENS_PER_BYTE,
    estimate_tokens,
    fit_history,
    history_budget,
    tokens_per_byte,
    without_oldest,
)
from actors.decide import TurnTotals, decide_cancelled, decide_orphan_end
from actors.model_client import refused_as_too_long, window_said
from actors.models import ModelSpec, catalogue_problems
from actors.state import Conversation, fold
from events.codec import decode_event
from events.vocabulary import ConversationCreated, Done, Started, UserMessage
from parley.config import ConfigError, Settings, load_catalog, settings_from_env

Message = dict[str, Any]

_text = st.text(max_size=60)  # no lone surrogates: nothing sends them


@st.composite
def exchanges(draw: st.DrawFn) -> list[list[Message]]:
    """Earlier exchanges: a user message, then its answer, perhaps after tool rounds."""
    out = []
    for n in range(draw(st.integers(0, 8))):
        exchange: list[Message] = [{"role": "user", "content": draw(_text)}]
        for r in range(draw(st.integers(0, 2))):
            call = f"call_{n}_{r}"
            exchange.append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": call,
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                }
            )
            exchange.append({"role": "tool", "tool_call_id": call, "content": draw(_text)})
        if draw(st.booleans()):
            exchange.append({"role": "assistant", "content": draw(_text)})
        out.append(exchange)
    return out


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[Message], int]:
    """A history as a turn sends it, with system messages anywhere before the message
    being answered; and how many messages are that message and what follows it."""
    earlier = [m for exchange in draw(exchanges()) for m in exchange]
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(earlier)))
        earlier.insert(at, {"role": "system", "content": draw(_text)})
    answered: list[Message] = [{"role": "user", "content": draw(_text)}]
    if draw(st.booleans()):  # this turn's tool round
        answered += [
            {"role": "assistant", "content": "", "tool_calls": [{"id": "now", "type": "function"}]},
            {"role": "tool", "tool_call_id": "now", "content": draw(_text)},
        ]
    return [*earlier, *answered], len(answered)


@given(histories(), st.integers(-50, 3_000), st.sampled_from([1.0, 0.25, 1 / 8]))
def test_what_is_kept_is_every_system_message_and_a_suffix_of_whole_exchanges(
    history: tuple[list[Message], int], budget: int, rate: float
) -> None:
    messages, answered = history
    fitted = fit_history(messages, budget, rate)
    kept_ids = {id(m) for m in fitted.messages}
    # what is kept is in order, and holds every system message and the turn's question
    assert [m for m in messages if id(m) in kept_ids] == fitted.messages
    assert all(id(m) in kept_ids for m in messages if m["role"] == "system")
    assert all(id(m) in kept_ids for m in messages[-answered:])
    # what is left out is the first non-system messages, as many as it says
    assert [m for m in messages if id(m) not in kept_ids] == [
        m for m in messages if m["role"] != "system"
    ][: fitted.omitted]
    assert without_oldest(messages, fitted.omitted) == fitted.messages
    # ... whole exchanges: the first kept non-system message is a user's question,
    # and every tool result kept has its call kept before it, and the other way round
    rest = [m for m in fitted.messages if m["role"] != "system"]
    assert rest[0]["role"] == "user"
    calls = {c["id"] for m in rest for c in m.get("tool_calls", [])}
    results = {m["tool_call_id"] for m in rest if m["role"] == "tool"}
    assert calls == results


@given(histories(), st.integers(0, 3_000), st.sampled_from([1.0, 0.25, 1 / 8]))
def test_what_is_sent_fits_and_no_more_is_left_out_than_needed(
    history: tuple[list[Message], int], budget: int, rate: float
) -> None:
    messages, answered = history
    fitted = fit_history(messages, budget, rate)
    assert fitted.tokens == _tokens(fitted.messages, rate)
    least = [m for m in messages[:-answered] if m["role"] == "system"] + messages[-answered:]
    if _tokens(messages, rate) <= budget:
        assert fitted.omitted == 0 and fitted.messages == messages
    elif _tokens(least, rate) <= budget:
        assert fitted.tokens <= budget
    else:  # even the least cannot fit: that is what is sent, and said to be over
        assert fitted.messages == least and fitted.tokens > budget
    if fitted.omitted:
        # the last exchange left out, kept, would not have fitted: the newest part that fits
        left_out = [m for m in messages if m["role"] != "system"][: fitted.omitted]
        last_start = max(i for i, m in enumerate(left_out) if m["role"] == "user")
        assert _tokens(without_oldest(messages, last_start), rate) > budget


def _tokens(messages: list[Message], rate: float) -> int:
    return sum(estimate_tokens(m, rate) + MESSAGE_OVERHEAD_TOKENS for m in messages)


def test_without_a_known_window_everything_is_sent() -> None:
    messages = [{"role": "user", "content": "x" * 100_000}, {"role": "user", "content": "hi"}]
    fitted = fit_history(messages, None)
    assert fitted.messages == messages and fitted.omitted == 0


@given(st.text(max_size=200), st.sampled_from(["user", "assistant", "system"]))
def test_one_token_a_byte_is_never_less_than_a_byte_level_tokenizer_counts(
    text: str, role: str
) -> None:
    """A byte-level BPE token (or a SentencePiece one with byte fallback) is at least one
    byte of UTF-8, so a text has at most as many tokens as bytes: the safe estimate of
    a message is over its text's count whatever the model, in any script."""
    message = {"role": role, "content": text}
    assert SAFE_TOKENS_PER_BYTE == 1.0
    assert estimate_tokens(message, SAFE_TOKENS_PER_BYTE) >= len(text.encode("utf-8", "replace"))


@pytest.mark.parametrize(
    ("tokens", "sent", "rate"),
    [
        (0, 0, 1.0),  # nothing measured: one token a byte
        (100, 0, 1.0),
        (0, 4000, 1.0),  # a provider that reports 0 prompt tokens is not believed
        (1000, 4000, 0.3125),  # 4 bytes a token, with a quarter more as margin
        (10, 4000, 1 / 8),  # never below one token in 8 bytes
        (5000, 4000, 1.0),  # never above one token a byte
    ],
)
def test_the_rate_is_the_measured_one_with_a_margin_within_safe_bounds(
    tokens: int, sent: int, rate: float
) -> None:
    assert tokens_per_byte(tokens, sent) == pytest.approx(rate)


@pytest.mark.parametrize(
    ("window", "max_output", "tools", "budget"),
    [
        (None, 4096, 100, None),
        (128_000, 4096, 1000, 128_000 - 4096 - 1000 - 8),
        (128_000, None, 0, 128_000 - 4096 - 8),  # unset: a reserve of 4096 tokens
        (8192, None, 0, 8192 - 2048 - 8),  # ... never more than a quarter of the window
    ],
)
def test_the_history_has_the_window_less_the_answer_and_the_tools(
    window: int | None, max_output: int | None, tools: int, budget: int | None
) -> None:
    assert history_budget(window, max_output, tools) == budget


# What providers answer to a request longer than the model's window, as they send it.
OPENAI = {
    "error": {
        "message": "This model's maximum context length is 128000 tokens. However, your"
        " messages resulted in 130012 tokens. Please reduce the length of the messages.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}
VLLM_OLD = {
    "object": "error",
    "message": "This model's maximum context length is 4096 tokens. However, you requested"
    " 5000 tokens (4000 in the messages, 1000 in the completion).",
    "type": "BadRequestError",
    "param": None,
    "code": 400,
}
VLLM_NEW = {
    "error": {
        "message": "'max_tokens' or 'max_completion_tokens' is too large: 8000. This model's"
        " maximum context length is 4096 tokens and your request has 2778 input tokens"
        " (8000 > 4096 - 2778). None",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
}
LLAMA_CPP = {
    "error": {
        "code": 400,
        "message": "request (4476 tokens) exceeds the available context size (4096 tokens)",
        "type": "exceed_context_size_error",
        "n_prompt_tokens": 4476,
        "n_ctx": 4096,
    }
}
ANTHROPIC = {
    "type": "error",
    "error": {
        "type": "invalid_request_error",
        "message": "prompt is too long: 208310 tokens > 200000 maximum",
    },
}
# vLLM's and SGLang's answer to a request their pydantic models refuse: the error's
# text echoes the input it refused, here the user's own words
VLLM_VALIDATION = {
    "object": "error",
    "message": "[{'type': 'string_type', 'loc': ('body', 'messages', 1, 'content'), 'msg':"
    " 'Input should be a valid string', 'input': 'what is the context length of gpt-4o?'}]",
    "type": "BadRequestError",
    "param": None,
    "code": 400,
}
PYDANTIC_VALIDATION = {
    "object": "error",
    "message": "1 validation error for ChatCompletionRequest\nmessages.1.name\n  String should"
    " have at most 64 characters [type=string_too_long, input_value=\"what's the maximum"
    ' context length is 4096 tokens", input_type=str]',
    "type": "BadRequestError",
    "param": None,
    "code": 400,
}
# LiteLLM's proxy passes the provider's refusal on quoted in its own message
LITELLM = {
    "error": {
        "message": "litellm.ContextWindowExceededError: litellm.BadRequestError:"
        " ContextWindowExceededError: OpenAIException - Error code: 400 - {'error':"
        " {'message': \"This model's maximum context length is 128000 tokens. However, your"
        ' messages resulted in 419624 tokens. Please reduce the length of the messages.",'
        " 'type': 'invalid_request_error', 'param': 'messages', 'code':"
        " 'context_length_exceeded'}}",
        "type": None,
        "param": None,
        "code": "400",
    }
}
GEMINI = [  # Gemini's OpenAI endpoint answers a list
    {
        "error": {
            "code": 400,
            "message": "The input token count (1200000) exceeds the maximum number of tokens"
            " allowed (1048576).",
            "status": "INVALID_ARGUMENT",
        }
    }
]


@pytest.mark.parametrize(
    ("status", "body", "too_long"),
    [
        (400, OPENAI, True),
        (400, VLLM_OLD, True),
        (400, VLLM_NEW, True),
        (400, LLAMA_CPP, True),
        (400, ANTHROPIC, True),
        (400, {"error": {"message": "Invalid 'messages[1].role'", "code": None}}, False),
        # a validation error that echoes the user's words about context lengths
        (400, VLLM_VALIDATION, False),
        (400, PYDANTIC_VALIDATION, False),
        (400, LITELLM, True),
        # OpenAI's refusal of a max_tokens above the model's output limit
        (
            400,
            {
                "error": {
                    "message": "max_tokens is too large: 100000. This model supports at most"
                    " 16384 completion tokens, whereas you provided 100000.",
                    "type": "invalid_request_error",
                    "param": "max_tokens",
                    "code": "invalid_value",
                }
            },
            False,
        ),
        # a rate limit on tokens is tried again as one, not trimmed
        (429, {"error": {"message": "Rate limit reached: too many tokens per minute"}}, False),
        (500, OPENAI, False),
        # the user's own words echoed by a validation error are not the provider's reason
        (422, {"detail": [{"msg": "field required", "input": "my context window"}]}, False),
        (400, b"the context length is exceeded", True),
        (400, b"<html>Bad Request</html>", False),
    ],
)
def test_a_refusal_for_length_is_told_from_other_refusals(
    status: int, body: Any, too_long: bool
) -> None:
    raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
    assert refused_as_too_long(status, raw) is too_long


@pytest.mark.parametrize(
    ("body", "window"),
    [
        (OPENAI, 128_000),
        (VLLM_OLD, 4096),
        (VLLM_NEW, 4096),
        (LLAMA_CPP, 4096),
        (ANTHROPIC, 200_000),
        (
            {
                "message": "Prompt contains 40000 tokens and 0 draft tokens, too large for model"
                " with 32768 maximum context length"
            },
            32768,
        ),
        (
            {"message": "This model's maximum prompt length is 131072 but the request contains"},
            131072,
        ),
        ({"message": "the context length is exceeded"}, None),
        (LITELLM, 128_000),
        # SGLang, and its older wording as Together's
        (
            {
                "message": "Requested token count exceeds the model's maximum context length"
                " of 32768 tokens. You requested a total of 34000 tokens: 33000 tokens from"
                " the input messages and 1000 tokens for the completion."
            },
            32768,
        ),
        (
            {
                "message": "The input (150000 tokens) is longer than the model's context"
                " length (131072 tokens)."
            },
            131072,
        ),
        # not a number the user wrote, echoed by a validation error
        (PYDANTIC_VALIDATION, None),
    ],
)
def test_the_window_a_refusal_names_is_read(body: dict[str, Any], window: int | None) -> None:
    error = body.get("error", body)
    assert window_said(error["message"]) == window


def test_gemini_s_list_shaped_refusal_is_read_as_text() -> None:
    # its error object inside a list: read as text, as the rest of its body is
    assert refused_as_too_long(400, msgspec.json.encode(GEMINI)) is True


def test_a_models_file_whose_answer_room_fills_the_window_is_refused() -> None:
    spec = ModelSpec(name="m", context_window=4096, max_output_tokens=4096)
    assert catalogue_problems([spec]) == [
        "model 'm': max_output_tokens 4096 leaves no room for any message in its"
        " context_window 4096"
    ]
    assert (
        catalogue_problems([ModelSpec(name="m", context_window=4097, max_output_tokens=4096)]) == []
    )


def test_the_environment_s_model_gets_its_window_from_the_environment(tmp_path: Path) -> None:
    settings = settings_from_env(
        {"PARLEY_MODEL": "gpt-x", "PARLEY_MODEL_CONTEXT_WINDOW": "128000"}, tmp_path
    )
    spec = load_catalog(settings, {}).get(None)
    assert spec is not None and (spec.name, spec.context_window) == ("gpt-x", 128_000)
    demo = load_catalog(Settings(data_dir=tmp_path, model_context_window=900), {}).get(None)
    assert demo is not None and demo.context_window == 900
    for bad in ("0", "-5", "many"):
        with pytest.raises(ConfigError, match="PARLEY_MODEL_CONTEXT_WINDOW"):
            settings_from_env({"PARLEY_MODEL_CONTEXT_WINDOW": bad}, tmp_path)


def test_a_window_the_models_file_gives_otherwise_is_refused(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[[models]]\nname = "gpt-x"\ncontext_window = 8000\n')
    env = {"PARLEY_MODEL": "gpt-x", "PARLEY_MODELS_FILE": str(models)}
    assert load_catalog(settings_from_env(env, tmp_path), {}).get(None) is not None
    same = settings_from_env({**env, "PARLEY_MODEL_CONTEXT_WINDOW": "8000"}, tmp_path)
    assert load_catalog(same, {}).get(None) is not None
    other = settings_from_env({**env, "PARLEY_MODEL_CONTEXT_WINDOW": "9000"}, tmp_path)
    with pytest.raises(ConfigError, match="set one of them"):
        load_catalog(other, {})


def test_turn_events_written_before_the_counts_existed_still_decode() -> None:
    started = decode_event(
        b'{"type":"started","conversation_id":"c","at":1,"event_id":"e",'
        b'"turn_id":"t","user_message_id":"u","model":"demo"}'
    )
    done = decode_event(
        b'{"type":"done","conversation_id":"c","at":1,"event_id":"e","turn_id":"t",'
        b'"content":[],"stop_reason":"stop","input_tokens":1,"output_tokens":1}'
    )
    assert isinstance(started, Started) and started.history_omitted == 0
    assert isinstance(done, Done) and (done.history_omitted, done.input_bytes) == (0, 0)


def test_a_turn_s_end_never_says_fewer_messages_were_left_out_than_its_start() -> None:
    """`started` says the first call left 4 earlier messages out. An end whose totals do
    not know it (the orphan's estimate of a turn whose worker died, a turn cancelled
    before its first call answered) said 0, and viewers read `done` without it."""
    events = [
        ConversationCreated(conversation_id="c", at=1, event_id="e1", user_id="u"),
        UserMessage(conversation_id="c", at=2, event_id="e2", message_id="m", content="hi"),
        Started(
            conversation_id="c",
            at=3,
            event_id="e3",
            turn_id="t",
            user_message_id="m",
            model="demo",
            history_omitted=4,
        ),
    ]
    state = fold(Conversation(conversation_id="c"), events)
    ids = iter(f"id{i}" for i in range(10))
    assert decide_orphan_end(state, 4, lambda: next(ids)).history_omitted == 4
    cancelled = decide_cancelled(state, "user", TurnTotals(), 4, lambda: next(ids))
    assert cancelled.history_omitted == 4
    # a refusal that cut the history further says so
    deeper = decide_cancelled(state, "user", TurnTotals(history_omitted=6), 4, lambda: next(ids))
    assert deeper.history_omitted == 6
