"""`felix <verb> --help` is the reference a person reads: every sub-parser the real parser builds has a
description, every option (but -h) a help line, and a verb's help line that lists its sub-verbs lists them all."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

import pytest

from felix.cli import VERBS, build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...],
                                                                                 argparse.ArgumentParser]]:
    yield path, parser
    for name, child in _subparsers(parser).items():
        yield from _walk(child, (*path, name))


def _every_parser() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every verb's parser and the sub-parsers below it (a verb's parser is built whole only when it is run)."""
    return {path: p for verb in VERBS for path, p in _walk(_subparsers(build_parser(verb))[verb], (verb,))}


PARSERS = _every_parser()


@pytest.mark.parametrize("path", sorted(PARSERS), ids=" ".join)
def test_every_parser_has_a_description(path):
    assert (PARSERS[path].description or "").strip(), f"`felix {' '.join(path)} --help` has no description"


@pytest.mark.parametrize("path", sorted(PARSERS), ids=" ".join)
def test_every_option_has_help(path):
    bare = [a.option_strings[0] if a.option_strings else a.dest for a in PARSERS[path]._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
            and a.help is not argparse.SUPPRESS and not (a.help or "").strip()]
    assert not bare, f"`felix {' '.join(path)} --help`: no help for {bare}"


def _sub_verbs(parser: argparse.ArgumentParser) -> set[str]:
    """A verb's sub-parsers, or the choices of its positional action (`felix harvest status`)."""
    return set(_subparsers(parser)) or next((set(a.choices) for a in parser._actions
                                             if a.dest == "action" and a.choices), set())


def _listed(help_line: str) -> list[str]:
    """The comma-separated words of a help line's parenthesized list, e.g. (diagnose, apply, ...)."""
    return [w.strip() for w in re.split(r"[,;]", m.group(1))] if (m := re.search(r"\(([^)]*)\)", help_line)) else []


LISTING = [v for v in VERBS if _sub_verbs(PARSERS[(v,)]) & set(_listed(VERBS[v]))]


def test_the_verbs_that_list_sub_verbs():
    assert {"splice", "harvest"} <= set(LISTING)


@pytest.mark.parametrize("verb", LISTING)
def test_a_help_line_that_lists_sub_verbs_lists_them_all(verb):
    missing = sorted(_sub_verbs(PARSERS[(verb,)]) - set(_listed(VERBS[verb])))
    assert not missing, f"`felix --help`'s line for {verb} leaves out {missing}"


def _default_problems(parser: argparse.ArgumentParser) -> list[str]:
    """Options whose default is a value (not None, off or empty) that their help line does not mention, or
    whose help gives another number as the default."""
    out = []
    for a in parser._actions:
        if not a.option_strings or isinstance(a, argparse._HelpAction) or a.default in (None, False, [],
                                                                                        argparse.SUPPRESS):
            continue
        if "default" not in (a.help or ""):
            out.append(f"{a.option_strings[0]}: no default shown (it is {a.default!r})")
        elif (isinstance(a.default, int | float) and (m := re.search(r"default:? (-?[0-9][0-9.e+-]*)", a.help))
              and float(m.group(1).rstrip(".")) != a.default):
            out.append(f"{a.option_strings[0]}: help says default {m.group(1)}, it is {a.default!r}")
    return out


@pytest.mark.parametrize("path", sorted(PARSERS), ids=" ".join)
def test_an_option_with_a_default_states_it(path):
    """`--port` without its 8642: a reader cannot tell what leaving an option out does."""
    problems = _default_problems(PARSERS[path])
    assert not problems, f"`felix {' '.join(path)} --help`: " + "; ".join(problems)
