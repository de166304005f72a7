"""Facts every Python install holds, and the text that states them: the demo's optional `facts` source.

Each fact is a (subject, relation, object) triple read from a table of the standard library (HTTP reason
phrases, errno messages, exception bases, HTML entities, MIME types, signal numbers). Each relation has a
few statement templates, so one fact is said several ways: a model that learns the facts from some
statements can be edited on one and checked on the others (paraphrases), and other subjects of the same
relation are the edit's neighbours (locality), as in CounterFact. The tables are the same on every
machine with the same Python version and platform; facts that differ elsewhere are simply not held.
"""

from __future__ import annotations

import builtins
import errno
import html.entities
import http
import inspect
import mimetypes
import os
import random
import signal
from dataclasses import dataclass

OBJECT = "{o}"

# Statement templates per relation: "{s}" is the subject, "{o}" the object, each exactly once.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "http_status": ("HTTP/1.1 {s} {o}", "HTTP status {s} means {o}.", "The reason phrase of status code {s} is {o}."),
    "errno_message": ("errno.{s}: {o}", "The error {s} means {o}.", "os.strerror(errno.{s}) returns {o}."),
    "exception_base": ("{s} inherits from {o}.", "{s} is a subclass of {o}.", "The base class of {s} is {o}."),
    "html_entity": ("&{s}; is {o}", "The HTML entity &{s}; stands for {o}.", "&{s}; renders as {o}."),
    "mime_type": ("Content-Type of {s} files: {o}", "A {s} file has the MIME type {o}.",
                  "mimetypes.guess_type('file{s}') gives {o}."),
    "signal_number": ("signal.{s} = {o}", "{s} is signal number {o}.", "The number of {s} is {o}."),
}


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    object: str

    def statement(self, template: str) -> str:
        return template.format(s=self.subject, o=self.object)

    def prompt(self, template: str) -> tuple[str, str]:
        """(prompt, target) of a statement: the text up to the object, and the object (a space before the
        object goes to the target, as the tokenizer puts it there)."""
        head = template[: template.index(OBJECT)].format(s=self.subject)
        if head.endswith(" "):
            return head[:-1], " " + self.object
        return head, self.object


def _exception_bases() -> list[tuple[str, str]]:
    return [(name, cls.__bases__[0].__name__) for name, cls in sorted(vars(builtins).items())
            if inspect.isclass(cls) and issubclass(cls, BaseException) and cls is not BaseException
            and cls.__name__ == name]  # not the aliases (IOError is OSError)


def stdlib_facts() -> list[Fact]:
    """Every fact of every relation, in a fixed order."""
    table = {
        "http_status": [(str(s.value), s.phrase) for s in http.HTTPStatus],
        "errno_message": [(name, os.strerror(code)) for code, name in sorted(errno.errorcode.items())],
        "exception_base": _exception_bases(),
        "html_entity": [(name, chr(cp)) for name, cp in sorted(html.entities.name2codepoint.items())],
        # the module's built-in table only: MimeTypes() reads no system files
        "mime_type": sorted(mimetypes.MimeTypes().types_map[True].items()),
        "signal_number": [(s.name, str(s.value)) for s in signal.Signals],
    }
    return [Fact(rel, s, o) for rel in TEMPLATES for s, o in table[rel]]


def fact_documents(facts: list[Fact], seed: int = 0, per_doc: int = 24) -> list[str]:
    """Every statement of every fact once (each template of each fact), shuffled into documents of
    `per_doc` lines."""
    lines = [f.statement(t) for f in facts for t in TEMPLATES[f.relation]]
    random.Random(seed).shuffle(lines)
    return ["\n".join(lines[i : i + per_doc]) for i in range(0, len(lines), per_doc)]
