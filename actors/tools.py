"""The tools the model may call during a turn (the ReAct loop's actions), and how to add more.

A tool is a name, a description, the JSON schema of its parameters (made from a
msgspec Struct or from the handler's typed signature, never written by hand)
and a handler, sync or async. A deployment adds tools without editing parley:

- an entry point in the group `parley.tools` (in its own package's metadata),
  naming a `Tool`, a list of them, or a function returning them;
- or `PARLEY_TOOLS=package.module:attribute,...` naming the same.

Every call is bounded: `timeout_s` (the model gets an error when it runs out),
`max_result_chars` (a longer result is cut with a note) and, for work, sync
handlers run in a thread of their own so a CPU-heavy tool never stalls the
event loop and every other turn on it; `max_concurrency` caps parallel calls
of one tool. A tool that raises, times out or returns something that is not
text gives the model an error result, never a dead turn.

A thread cannot be stopped. A sync call that outlives its `timeout_s` keeps
its slot of `max_concurrency` until its thread ends, so a tool that hangs
holds at most that many threads, and only its own later calls wait (and time
out); the threads are daemons outside the loop's shared executor, so neither
other tools, nor the edge's work in threads, nor the process's exit wait for
them.

Handlers get a `ToolContext`: the conversation, who asked, the clock reading
and the conversation's latest messages; they never read the clock themselves,
so a test can pin time. A handler may return `ToolReply` to also set the
conversation's title (the `set_title` built-in).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import inspect
import json
import logging
import re
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from importlib.metadata import entry_points
from typing import Any, get_type_hints

import msgspec

from events.codec import encodable

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "parley.tools"
# What OpenAI's API (and the servers that copy it) accept as a function's name; a
# request offering a tool named otherwise is refused whole, and every turn fails.
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ToolMessage(msgspec.Struct, frozen=True):
    """A message of the conversation as a tool sees it."""

    message_id: str
    role: str
    text: str


class ToolContext(msgspec.Struct, frozen=True):
    conversation_id: str
    user_id: str
    project_id: str | None
    now_ns: int
    messages: tuple[ToolMessage, ...] = ()


class ToolError(Exception):
    """A tool refused its input; the message goes back to the model as the tool's error."""


class ToolReply(msgspec.Struct, frozen=True):
    """A result, and effects on the conversation beyond it."""

    result: str
    set_title: str | None = None


class ToolOutcome(msgspec.Struct, frozen=True):
    result: str | None = None
    error: str | None = None
    set_title: str | None = None


Handler = Callable[..., Any]


class Tool(msgspec.Struct, frozen=True):
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    handler: Handler
    # how the arguments reach the handler: as one Struct, as keyword arguments, or as the raw dict
    arguments: type[msgspec.Struct] | None = None
    spread: bool = False
    timeout_s: float = 10.0
    max_result_chars: int = 64 * 1024
    max_concurrency: int = 8

    def schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


def define_tool(
    handler: Handler,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float = 10.0,
    max_result_chars: int = 64 * 1024,
    max_concurrency: int = 8,
) -> Tool:
    """A Tool from a handler: `handler(args: SomeStruct, ctx)` or `handler(a: int, b: str, ctx)`.

    The parameter schema comes from the Struct or from the typed signature (every
    parameter but the one annotated `ToolContext`); the description defaults to
    the handler's docstring.
    """
    hints = get_type_hints(handler)
    params = [
        p
        for p in inspect.signature(handler).parameters.values()
        if hints.get(p.name) is not ToolContext
    ]
    struct: type[msgspec.Struct]
    spread = True
    if len(params) == 1 and _is_struct(hints.get(params[0].name)):
        struct = hints[params[0].name]
        spread = False
    else:
        fields: list[tuple[str, Any] | tuple[str, Any, Any]] = [
            (p.name, hints.get(p.name, Any))
            if p.default is inspect.Parameter.empty
            else (p.name, hints.get(p.name, Any), p.default)
            for p in params
        ]
        struct = msgspec.defstruct(
            f"{handler.__name__}_arguments", fields, forbid_unknown_fields=True
        )
    name = name or handler.__name__
    if problem := name_problem(name):
        raise ToolLoadError(problem)
    return Tool(
        name=name,
        description=description or inspect.cleandoc(handler.__doc__ or "").split("\n\n")[0],
        parameters=json_schema(struct),
        handler=handler,
        arguments=struct,
        spread=spread,
        timeout_s=timeout_s,
        max_result_chars=max_result_chars,
        max_concurrency=max_concurrency,
    )


def name_problem(name: str) -> str | None:
    """Why a model's API would refuse a tool of this name, or None."""
    if _TOOL_NAME.fullmatch(name):
        return None
    return (
        f"tool name {name!r} is not 1 to 64 letters, digits, '_' or '-' "
        "(what an OpenAI-compatible API accepts)"
    )


def _is_struct(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, msgspec.Struct)


# keywords whose values are data, not schemas: never searched for references
_SCHEMA_DATA = frozenset({"default", "enum", "const", "examples", "required"})


def json_schema(struct: type[msgspec.Struct]) -> dict[str, Any]:
    """The Struct's JSON schema, inlined (models read one object, not $refs).

    msgspec names every nested Struct and Enum as a component; each reference to
    one is replaced by its schema, so the object is whole by itself: a reference
    to a component that is not sent with it is refused by the model's API (every
    turn offered the tool would fail). Only a type that contains itself cannot be
    inlined: it is sent once under `$defs` and referred to as `#/$defs/Name`.
    """
    (ref,), components = msgspec.json.schema_components([struct], ref_template="{name}")
    defs: dict[str, dict[str, Any]] = {}

    def component(name: str) -> dict[str, Any]:
        body = dict(components[name])
        body.pop("title", None)
        return body

    def define(name: str) -> None:
        if name not in defs:
            defs[name] = {}  # taken, while its own references to itself are resolved
            defs[name] = resolve(component(name), frozenset({name}))

    def resolve(node: Any, inside: frozenset[str]) -> Any:
        if isinstance(node, list):
            return [resolve(item, inside) for item in node]
        if not isinstance(node, dict):
            return node
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in ("$ref", "discriminator"):
                continue  # a discriminator's mapping names components, which are inlined
            if key in ("properties", "patternProperties") and isinstance(value, dict):
                out[key] = {field: resolve(schema, inside) for field, schema in value.items()}
            else:
                out[key] = value if key in _SCHEMA_DATA else resolve(value, inside)
        name = node.get("$ref")
        if not isinstance(name, str):
            return out
        if name in inside:
            define(name)
            return {"$ref": f"#/$defs/{name}", **out}
        return {**resolve(component(name), inside | {name}), **out}

    top = ref["$ref"]
    schema: dict[str, Any] = resolve(component(top), frozenset({top}))
    if defs:
        schema["$defs"] = defs
    return schema


# ---------------------------------------------------------------- running a call


class ToolRunner:
    """Runs calls with each tool's bounds; one per worker, shared by its turns."""

    def __init__(self, tools: Iterable[Tool]) -> None:
        self.tools = {tool.name: tool for tool in tools}
        self._slots = {
            tool.name: asyncio.Semaphore(tool.max_concurrency) for tool in self.tools.values()
        }

    def schemas(self) -> list[dict[str, Any]]:
        return [tool.schema() for tool in self.tools.values()]

    async def run(self, name: str, arguments: str, ctx: ToolContext) -> ToolOutcome:
        """Run one tool call; every failure becomes an error the model can read, never an exception.

        Its text is made encodable: a lone surrogate (from a `json.loads` of outside
        data, say) could be neither logged as an event nor sent to the model.
        """
        outcome = await self._outcome(name, arguments, ctx)
        return ToolOutcome(
            result=None if outcome.result is None else encodable(outcome.result),
            error=None if outcome.error is None else encodable(outcome.error),
            set_title=None if outcome.set_title is None else encodable(outcome.set_title),
        )

    async def _outcome(self, name: str, arguments: str, ctx: ToolContext) -> ToolOutcome:
        tool = self.tools.get(name)
        if tool is None:
            return ToolOutcome(error=f"unknown tool {name!r}")
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError) as err:
            # ValueError: JSONDecodeError, and a number of more than 4,300 digits (valid
            # JSON Python will not convert), which crashed the turn
            return ToolOutcome(error=f"arguments are not valid JSON: {getattr(err, 'msg', err)}")
        if not isinstance(args, dict):
            return ToolOutcome(error="arguments must be a JSON object")
        try:
            async with asyncio.timeout(tool.timeout_s):
                reply = await _call(tool, args, ctx, self._slots[name])
        except ToolError as err:
            return ToolOutcome(error=str(err))
        except msgspec.ValidationError as err:
            return ToolOutcome(error=f"invalid arguments: {err}")
        except TimeoutError:
            return ToolOutcome(error=f"tool {name!r} took longer than {tool.timeout_s:g}s")
        except Exception as err:
            # A broken tool is the model's problem to route around, not the turn's end.
            log.exception("tool crashed", extra={"tool": name})
            return ToolOutcome(error=f"tool {name!r} failed: {type(err).__name__}")
        title = reply.set_title if isinstance(reply, ToolReply) else None
        result = reply.result if isinstance(reply, ToolReply) else reply
        if not isinstance(result, str):
            return ToolOutcome(error=f"tool {name!r} returned {type(result).__name__}, not text")
        if len(result) > tool.max_result_chars:
            cut = len(result) - tool.max_result_chars
            result = result[: tool.max_result_chars] + f"\n[... {cut} characters cut]"
        return ToolOutcome(result=result, set_title=title)


async def _call(
    tool: Tool, args: dict[str, Any], ctx: ToolContext, slot: asyncio.Semaphore
) -> object:
    if tool.arguments is None:
        call: Callable[[], object] = lambda: tool.handler(args, ctx)  # noqa: E731
    elif tool.spread:
        values = msgspec.structs.asdict(msgspec.convert(args, tool.arguments))
        call = lambda: tool.handler(**values, **_ctx_kwarg(tool.handler, ctx))  # noqa: E731
    else:
        value = msgspec.convert(args, tool.arguments)
        named = _struct_kwargs(tool.handler, tool.arguments, value, ctx)
        if named is None:
            call = lambda: tool.handler(value, ctx)  # noqa: E731
        else:
            call = lambda: tool.handler(**named)  # noqa: E731
    if inspect.iscoroutinefunction(tool.handler):
        async with slot:
            result = call()
            assert isinstance(result, Awaitable)
            return await result
    await slot.acquire()
    return await _in_own_thread(call, slot.release, tool.name)


def _in_own_thread(
    call: Callable[[], object], done: Callable[[], None], name: str
) -> Awaitable[object]:
    """`call()` in a daemon thread; `done` runs on the loop when the thread ends, however late."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[object] = loop.create_future()

    def settle(result: object, error: BaseException | None) -> None:
        done()
        if future.done():  # abandoned at its time limit, or its turn was cancelled
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def work() -> None:
        result: object = None
        error: BaseException | None = None
        try:
            result = call()
        except BaseException as err:  # handed to the awaiting turn, which reports it
            error = err
        # a loop closed while the tool ran has nobody waiting for it any more
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, error)

    # A thread starts with an empty context: the tool's own log lines would not name
    # the request its turn serves (events/tracing.py). It runs in a copy of the turn's.
    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(work,), name=f"tool-{name}", daemon=True).start()
    return future


def _struct_kwargs(
    handler: Handler, struct: type[msgspec.Struct], value: msgspec.Struct, ctx: ToolContext
) -> dict[str, object] | None:
    """The keyword arguments of a handler that takes its arguments as one Struct: the
    Struct, and the context only where the handler asks for it (`handler(args)` is as
    good as `handler(args, ctx)` or `handler(ctx, args)`). None for a handler whose
    parameters are not typed: it is called as `handler(args, ctx)`."""
    try:
        hints = get_type_hints(handler)
    except (TypeError, NameError):  # a callable object, a name its module cannot resolve
        return None
    hints.pop("return", None)
    if struct not in hints.values():
        return None
    return {
        name: value if hint is struct else ctx
        for name, hint in hints.items()
        if hint is struct or hint is ToolContext
    }


def _ctx_kwarg(handler: Handler, ctx: ToolContext) -> dict[str, ToolContext]:
    hints = get_type_hints(handler)
    return {name: ctx for name, hint in hints.items() if hint is ToolContext}


# ---------------------------------------------------------------- loading tools


class ToolLoadError(ValueError):
    """A deployment's tools cannot be loaded as configured: the message says which and
    what to fix, in one line (the worker refuses to start with it)."""


def load_tools(specs: Sequence[str] = (), *, use_entry_points: bool = True) -> list[Tool]:
    """Tools named by `module:attribute` specs and by the `parley.tools` entry points.

    A spec or entry point that names no module, no attribute or no Tool, and two
    different tools of one name, raise `ToolLoadError` (a deployment's tool may
    replace a built-in, `merge_tools`, but not another of its own); an error raised by the deployment's own code as it is imported
    (or by its function returning the tools) is left as it is, its traceback being
    what shows where, with a note naming the spec.
    """
    found: dict[str, tuple[Tool, str]] = {}

    def add(tools: list[Tool], where: str) -> None:
        for tool in tools:
            earlier, named_by = found.get(tool.name, (tool, where))
            if earlier != tool:
                # one would silently hide the other from every model call
                raise ToolLoadError(
                    f"two tools are named {tool.name!r}: one from {named_by}, "
                    f"one from {where}; give one another name"
                )
            found[tool.name] = (tool, named_by)

    if use_entry_points:
        for point in entry_points(group=ENTRY_POINT_GROUP):
            where = f"entry point {point.name!r} = {point.value!r} (group {ENTRY_POINT_GROUP})"
            add(_tools_in(_named(point.module, point.attr, where), where), where)
    for spec in specs:
        where = f"tool spec {spec!r} (PARLEY_TOOLS)"
        module_name, _, attribute = (part.strip() for part in spec.partition(":"))
        if not module_name or not attribute:
            raise ToolLoadError(f"{where} is not module:attribute")
        add(_tools_in(_named(module_name, attribute, where), where), where)
    return [tool for tool, _ in found.values()]


def _named(module_name: str, attribute: str | None, where: str) -> object:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise ToolLoadError(
                f"{where}: no module named {missing!r} (is its package installed in this "
                "environment, or its folder on PYTHONPATH?)"
            ) from err
        err.add_note(f"while importing the tools of {where}")
        raise  # a module the tools' own module imports: its traceback shows where
    except ToolLoadError as err:  # define_tool refused one of the module's tools
        raise ToolLoadError(f"{where}: {err}") from err
    except Exception as err:
        err.add_note(f"while importing the tools of {where}")
        raise
    value: object = module
    for name in attribute.split(".") if attribute else ():
        if not hasattr(value, name):
            raise ToolLoadError(f"{where}: module {module_name!r} has no attribute {attribute!r}")
        value = getattr(value, name)
    return value


def _tools_in(value: object, where: str) -> list[Tool]:
    if callable(value) and not isinstance(value, Tool):
        try:
            value = value()
        except Exception as err:
            err.add_note(f"while making the tools of {where}")
            raise
    tools: list[Any] | None = [value] if isinstance(value, Tool) else None
    if tools is None and isinstance(value, Iterable) and not isinstance(value, str | bytes):
        tools = list(value)
    if tools is not None and all(isinstance(t, Tool) for t in tools):
        for tool in tools:
            if problem := name_problem(tool.name):
                raise ToolLoadError(f"{where}: {problem}")
        return tools
    raise ToolLoadError(
        f"{where}: {type(value).__name__} is not a Tool, a list of Tools or a function "
        "returning them"
    )


def merge_tools(*groups: Iterable[Tool]) -> list[Tool]:
    """Later groups replace earlier tools of the same name (a deployment may override a built-in)."""
    merged: dict[str, Tool] = {}
    for group in groups:
        for tool in group:
            merged[tool.name] = tool
    return list(merged.values())
