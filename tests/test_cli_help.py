"""`parley COMMAND --help` explains every option: each argument of each command has help."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

from parley.cli import build_parser


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser, the top one and each (nested) subcommand's, with its command words."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from commands(child, (*path, name))


def test_every_option_of_every_command_has_help() -> None:
    missing = [
        f"parley {' '.join(path)} {'/'.join(action.option_strings) or action.dest}".replace(
            "  ", " "
        )
        for path, parser in commands(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction)
        and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert not missing, f"options without help: {missing}"
    names = {path for path, _ in commands(build_parser())}
    assert {("dev",), ("serve",), ("token",), ("replay",), ("projections", "errors")} <= names


def test_every_subcommand_has_a_description_for_its_help_page() -> None:
    bare = [
        " ".join(path)
        for path, parser in commands(build_parser())
        if path and not parser.description
    ]
    assert not bare, f"commands whose --help page says nothing about them: {bare}"


async def test_help_pages_print_from_the_installed_command() -> None:
    parley = Path(sys.executable).parent / "parley"
    process = await asyncio.create_subprocess_exec(
        str(parley),
        "serve",
        "--help",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    text = out.decode()
    assert "--role {edge,worker,projector,all}" in text, text
    assert "which role this process runs" in text and "PARLEY_METRICS_PORT" in text, text


def test_the_error_listing_says_it_shows_the_latest() -> None:
    # `--limit N` lists the latest N (tests/test_cli.py); "oldest first" sent an
    # operator who wanted the newest errors to a limit that would never show them
    parser = dict(commands(build_parser()))[("projections", "errors")]
    limit = next(a for a in parser._actions if "--limit" in a.option_strings)
    assert "latest" in (limit.help or "") and "oldest" not in (limit.help or ""), limit.help
    assert "oldest" not in (parser.description or ""), parser.description


def test_every_data_option_says_what_it_defaults_to() -> None:
    # each command reads PARLEY_DATA when --data is not given (parley/config.py)
    helps = {
        " ".join(path): action.help
        for path, parser in commands(build_parser())
        for action in parser._actions
        if "--data" in action.option_strings
    }
    assert all("PARLEY_DATA" in (text or "") for text in helps.values()), helps
