"""The `felix` command lines in README.md and docs/*.md match the parser: a flag renamed or dropped in code
fails here until the docs follow. Experiment records (docs/experiments/) keep the commands as they were run."""

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
