"""The `felix` command lines in README.md and docs/*.md match the parser: a flag renamed or dropped in code
fails here until the docs follow. Experiment records (docs/experiments/) keep the commands as they were run."""

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from felix.cli import VERBS, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
USAGE_SYNTAX = re.compile(r"[\[\]{}<>|]|\.\.\.|\(")  # a synopsis, not a command to run
COMMAND = re.compile(r"^(?:\$ )?(?:[A-Z_][A-Z0-9_]*=(?:\$\([^)]*\)|\S+) )*(?:.*&& )?(?:\.venv/bin/)?felix ([a-z].*)$")


def doc_commands(text: str) -> list[str]:
    """`felix ...` lines of fenced code blocks (backslash continuations joined; synopsis lines
    continue on indented lines), without the `felix` and any trailing shell comment or command."""
    out: list[str] = []
    in_block, current = False, None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_block, current = not in_block, None
            continue
        if not in_block:
            continue
        if current is not None and (out[current].endswith("\\") or line[:1].isspace() and "--" in line):
            out[current] = out[current].removesuffix("\\").rstrip() + " " + line.strip()
            continue
        m = COMMAND.match(line.strip())
        current = None
        if m and not re.search(r"\s{2,}felix ", line):  # several verbs spaced apart: a diagram's labels
            out.append(m.group(1))
            current = len(out) - 1
    return [re.split(r"\s+#|\s*(?:&&|;)\s", c)[0].strip() for c in out]


def verb_path(argv: list[str]) -> list[str]:
    """The verb and sub-verb words that lead a command line (`splice bench`, `data corpus`)."""
    words = []
    for word in argv:
        if word.startswith("-") or not re.fullmatch(r"[a-z][a-z-]*", word) or len(words) == 2:
            break
        words.append(word)
    return words


def help_text(words: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser(words[0]).parse_args([*words, "--help"])
    return out.getvalue()


CASES = [(path, cmd) for path in DOCS for cmd in doc_commands(path.read_text(encoding="utf-8"))]


def test_the_docs_have_commands_to_check():
    assert len(CASES) >= 40 and {cmd.split()[0] for _, cmd in CASES} >= {"demo", "train", "splice", "serve"}


@pytest.mark.parametrize(("path", "cmd"), CASES, ids=[f"{p.name}:{c[:40]}" for p, c in CASES])
def test_documented_command_matches_the_parser(path, cmd):
    synopsis = bool(USAGE_SYNTAX.search(cmd))
    argv = cmd.split() if synopsis else shlex.split(cmd)
    assert argv[0] in VERBS, f"{path.name}: unknown verb in `felix {cmd}`"
    if synopsis:
        # A synopsis: every option it names must be one the (sub)command has.
        text = help_text(verb_path(argv))
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", cmd):
            assert re.search(rf"{re.escape(flag)}\b(?!-)", text), f"{path.name}: `felix {cmd}` names {flag}"
        return
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser(argv[0]).parse_args(argv)
    except SystemExit as exc:
        assert not exc.code, f"{path.name}: `felix {cmd}`: {err.getvalue().strip().splitlines()[-1]}"


INLINE = re.compile(r"`felix ([a-z][^`]*)`")


def inline_commands(text: str) -> list[str]:
    """`felix ...` code spans of the prose (outside fenced blocks; a span may wrap a line), without the `felix`."""
    prose = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)
    return [m.group(1) for m in INLINE.finditer(prose.replace("\n", " "))]


def sub_verbs(verb: str) -> set[str]:
    """A verb's sub-verbs: its sub-parsers, or the choices of its positional action (`felix harvest export`)."""
    parser = next(a for a in build_parser(verb)._actions if isinstance(a, argparse._SubParsersAction)).choices[verb]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or (action.dest == "action" and action.choices):
            return set(action.choices)
    return set()


INLINE_CASES = [(path, cmd) for path in DOCS for cmd in inline_commands(path.read_text(encoding="utf-8"))]


def test_the_prose_has_commands_to_check():
    with_flags = [cmd for _, cmd in INLINE_CASES if " --" in cmd]
    assert len(INLINE_CASES) >= 100 and len(with_flags) >= 30


@pytest.mark.parametrize(("path", "cmd"), INLINE_CASES, ids=[f"{p.name}:{c[:40]}" for p, c in INLINE_CASES])
def test_a_command_named_in_the_prose_matches_the_parser(path, cmd):
    """`felix splice apply --checkpoint ART` in a sentence: the verb, its sub-verb and every flag exist."""
    words = verb_path(cmd.split())
    assert words and words[0] in VERBS, f"{path.name}: unknown verb in `felix {cmd}`"
    subs = sub_verbs(words[0])
    if len(words) == 2 and subs:
        assert words[1] in subs, f"{path.name}: `felix {cmd}`: {words[0]} has no sub-verb {words[1]!r}"
    text = help_text(words if len(words) == 2 and words[1] in subs else words[:1])
    for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", cmd):
        assert re.search(rf"{re.escape(flag)}\b(?!-)", text), f"{path.name}: `felix {cmd}` names {flag}"


def help_commands() -> list[tuple[str, str]]:
    """(`felix VERB [SUB]`, command) for each `felix ...` a --help text (description, epilog, option help) quotes:
    code spans, and example lines (backslash continuations joined)."""
    out = []
    for verb in VERBS:
        top = next(a for a in build_parser(verb)._actions if isinstance(a, argparse._SubParsersAction))
        parsers = [(verb, top.choices[verb])]
        parsers += [(f"{verb} {name}", p) for a in top.choices[verb]._actions
                    if isinstance(a, argparse._SubParsersAction) for name, p in a.choices.items()]
        for where, parser in parsers:
            helps = [a.help for a in parser._actions if isinstance(a.help, str)]
            text = re.sub(r"\\\n\s*", "", "\n".join([parser.description or "", parser.epilog or "", *helps]))
            out += [(where, m.group(1)) for m in INLINE.finditer(text.replace("\n", " "))]
            out += [(where, m.group(1).strip()) for m in re.finditer(r"^\s*felix ([a-z].*)$", text, re.M)]
    return out


HELP_CASES = help_commands()


def test_the_help_texts_have_commands_to_check():
    assert {where for where, _ in HELP_CASES} >= {"train", "quantize", "plan"}


@pytest.mark.parametrize(("where", "cmd"), HELP_CASES, ids=[f"{w}:{c[:40]}" for w, c in HELP_CASES])
def test_a_command_a_help_text_quotes_matches_the_parser(where, cmd):
    test_a_command_named_in_the_prose_matches_the_parser(Path(f"felix {where} --help"), cmd)
