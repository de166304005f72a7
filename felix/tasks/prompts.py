"""Prompt templates per task: a system message and a user template, versioned.

Bump a task's PROMPT_VERSION whenever its wording changes: harvested answers are keyed by it, so a
new wording never reuses answers written for the old one.

Inputs: encoding and episode summarization take a string (a capture, a timeline); retrieval
synthesis takes {"question", "memories": [{"id", "text"}]} (ids M1, M2, ..., each once: what an answer
cites); principle abstraction takes {"memories": [{"id", "text"}]}.
"""

from __future__ import annotations

import re
from typing import Any

PROMPT_VERSION = {
    "encoding": "encoding-v1",
    "retrieval_synthesis": "retrieval_synthesis-v1",
    "principle_abstraction": "principle_abstraction-v1",
    "episode_summarization": "episode_summarization-v1",
}

_JSON_ONLY = "Reply with one JSON object and nothing else: no code fences, no comments, no text around it."
_FAITHFUL = ("Use only what the input says. Keep file paths with line numbers, numbers, names and identifiers "
             "exactly as written; never add people, numbers or events that are not in the input.")

SYSTEM = {
    "encoding": f"""You turn a raw observation from a developer's working day into a structured memory.
{_FAITHFUL}
{_JSON_ONLY} It has exactly these fields:
- "gist": the memory in at most 80 characters.
- "summary": one or two sentences.
- "content": the observation restated cleanly, keeping every fact, reference and number.
- "narrative": what happened and why it matters, in a few sentences.
- "concepts": a list of short lowercase keywords.
- "structured_concepts": {{"topics": [{{"label", "path"}}], "entities": [{{"name", "type", "context"}}],
  "actions": [{{"verb", "object", "details"}}], "causality": [{{"relation", "description"}}]}}.
  Entity types: person, file, function, service, tool, error, commit, project, place, other.
- "significance": one of critical, important, notable, routine, trivial.
- "emotional_tone": one of neutral, satisfying, frustrating, exciting, concerning.
- "outcome": one of success, failure, ongoing, unknown.
- "salience": a number from 0 to 1, how much this is worth remembering.""",
    "retrieval_synthesis": f"""You answer a developer's question from memories retrieved for it.
Write two to five sentences grounded only in those memories. {_FAITHFUL}
If the memories do not answer the question, say so plainly in two sentences and cite nothing.
{_JSON_ONLY} Fields: "answer" (the sentences) and "cited" (the ids of the memories you used, such as "M2").""",
    "principle_abstraction": f"""You look at several memories and decide whether they share a lesson that
would hold beyond these cases: a reusable principle, not a restatement of one event.
If they do not share one, that is a valid answer: set "has_principle" to false, leave "title" and
"principle" empty, "concepts" empty and "confidence" at most 0.3. Never invent a common cause.
{_JSON_ONLY} Fields: "has_principle" (true or false), "title" (at most 60 characters), "principle"
(one or two sentences, general enough to apply elsewhere), "concepts" (short lowercase keywords),
"confidence" (0 to 1, how strongly the memories support the principle).""",
    "episode_summarization": f"""You summarize a timeline of events from one working session or incident
into an episode. {_FAITHFUL}
{_JSON_ONLY} Fields: "title" (at most 60 characters), "summary" (at most 120 characters: what happened
and how it ended), "concepts" (short lowercase keywords), "salience" (0 to 1, how much it is worth
remembering).""",
}

USER = {
    "encoding": "Observation:\n{input}\n\nEncode it as the JSON memory.",
    "retrieval_synthesis": "Question: {question}\n\nRetrieved memories:\n{memories}\n\nAnswer from these memories.",
    "principle_abstraction": "Memories:\n{memories}\n\nIs there a principle here?",
    "episode_summarization": "Timeline:\n{input}\n\nSummarize it as an episode.",
}


def format_memories(memories: list[dict[str, Any]]) -> str:
    """Memories as `[M1] text` blocks, one per paragraph."""
    return "\n\n".join(f"[{m['id']}] {m['text']}" for m in memories)


_MEMORY_ID = re.compile(r"M\d+")


def input_problem(task: str, input: Any) -> str | None:
    """Why `input` is not the shape `task` takes (see the module docstring), or None when it is."""
    if task in ("encoding", "episode_summarization"):
        return None if isinstance(input, str) else f"{task} input must be a string, got {type(input).__name__}"
    if not isinstance(input, dict):
        return f"{task} input must be an object with \"memories\", got {type(input).__name__}"
    if task == "retrieval_synthesis" and not isinstance(input.get("question"), str):
        return "retrieval_synthesis input needs a \"question\" string"
    mems = input.get("memories")
    if not isinstance(mems, list) or not mems:
        return f"{task} input needs a non-empty \"memories\" list"
    seen: set[str] = set()
    for i, m in enumerate(mems):
        if not (isinstance(m, dict) and isinstance(m.get("id"), str) and isinstance(m.get("text"), str)):
            return f"memories[{i}] must be an object with \"id\" and \"text\" strings"
        if task != "retrieval_synthesis":
            continue
        # An answer cites ids by the schema's pattern (M1, M2, ...): any other id could never be cited, and a
        # repeated one would make a citation ambiguous.
        if not _MEMORY_ID.fullmatch(m["id"]):
            return f"memories[{i}].id {m['id']!r} must be M followed by digits (M1, M2, ...), the ids answers cite"
        if m["id"] in seen:
            return f"memories[{i}].id {m['id']!r} is given twice"
        seen.add(m["id"])
    return None


def render(task: str, input: Any) -> tuple[str, str]:
    """The (system, user) messages for one input of `task`."""
    if task not in SYSTEM:
        raise KeyError(f"unknown task {task!r}")
    if task in ("encoding", "episode_summarization"):
        user = USER[task].format(input=str(input).strip())
    elif task == "retrieval_synthesis":
        user = USER[task].format(question=input["question"].strip(), memories=format_memories(input["memories"]))
    else:
        user = USER[task].format(memories=format_memories(input["memories"]))
    return SYSTEM[task], user
