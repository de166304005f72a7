"""The task suite: the shipped dev/test sets, prompts for items, gold references and corruptions.

The shipped files are generated, never edited: `python -m felix.tasks.suite` rewrites them from
SETS, and a test checks the files in the repo are byte-identical to a fresh generation.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any

from felix.atomic import atomic_write_text
from felix.errors import FelixError
from felix.jsonl import JsonlError, json_objects
from felix.tasks import match, prompts
from felix.tasks.schemas import TASKS
from felix.tasks.simulate import CATEGORIES, Draft, simulate

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "tasks"
# name -> (seed, items per task and category). 4 tasks x 5 categories x n.
SETS = {"dev": (20260501, 2), "test": (20260502, 4)}
FIELDS = ("id", "task", "category", "input", "prompt_version", "must_contain", "must_not_fabricate",
          "expect_refusal", "expect", "twin_of", "reference")


def build_reference(task: str, inp: Any, truth: dict[str, Any]) -> dict[str, Any]:
    """The gold answer of an item from the facts the simulator recorded about it."""
    if task == "encoding":
        content = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in str(inp).strip().splitlines()))
        return {"gist": truth["gist"], "summary": truth["summary"], "content": content, "narrative": truth["narrative"],
                "concepts": truth["concepts"], "structured_concepts": truth["structured_concepts"],
                "significance": truth["significance"], "emotional_tone": truth["emotional_tone"],
                "outcome": truth["outcome"], "salience": truth["salience"]}
    if task == "retrieval_synthesis":
        return {"answer": " ".join(truth["answer"]), "cited": truth["cited"]}
    if task == "principle_abstraction":
        return {k: truth[k] for k in ("has_principle", "title", "principle", "concepts", "confidence")}
    return {k: truth[k] for k in ("title", "summary", "concepts", "salience")}


def build_set(name: str) -> list[dict[str, Any]]:
    """The items of shipped set `name`, references included, in a fixed order."""
    if name not in SETS:
        raise FelixError(f"unknown task set {name!r}; expected one of {', '.join(SETS)}")
    seed, n = SETS[name]
    items = []
    for task in TASKS:
        for cat in CATEGORIES:
            d: Draft
            for d in simulate(task, cat, seed, n, prefix=name):
                item = {**d.item, "reference": build_reference(task, d.item["input"], d.truth)}
                items.append({k: item[k] for k in FIELDS})
    return items


def render_jsonl(items: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)


def write_sets(out_dir: Path = DATA_DIR) -> dict[str, Path]:
    """Regenerate every shipped set into `out_dir` (atomically, one file per set)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in SETS:
        paths[name] = out_dir / f"{name}.jsonl"
        atomic_write_text(paths[name], render_jsonl(build_set(name)))
    return paths


def load_set(name: str) -> list[dict[str, Any]]:
    """A shipped set as stored in the package."""
    path = DATA_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise FelixError(f"{path}: shipped task set is missing; run `python -m felix.tasks.suite`")
    try:
        return [item for _, item in json_objects(path)]
    except JsonlError as exc:
        raise FelixError(f"{exc.where}: damaged shipped task set ({exc.problem}); reinstall felix or run "
                         f"`python -m felix.tasks.suite`") from None


@cache
def shipped_index() -> dict[str, dict[str, Any]]:
    """Every shipped item by id."""
    return {it["id"]: it for name in SETS for it in load_set(name)}


def render_prompt(item: dict[str, Any]) -> tuple[str, str]:
    """The (system, user) messages for an item."""
    return prompts.render(item["task"], item["input"])


CORRUPTIONS = ("drop_number", "change_ref", "fabricate_person", "long_gist", "salience_high", "bad_enum",
               "placeholder_gist", "empty_content", "missed_refusal")
# What the gate must answer for each corruption.
EXPECTED_CODE = {"drop_number": "number_dropped", "change_ref": "ref_changed", "fabricate_person": "fabricated_entity",
                 "long_gist": "gist_too_long", "salience_high": "salience_out_of_range", "bad_enum": "bad_enum",
                 "placeholder_gist": "placeholder_gist", "empty_content": "empty_content",
                 "missed_refusal": "missed_refusal"}


def _sub(value: Any, pattern: re.Pattern[str], repl: str) -> Any:
    """`pattern` replaced by `repl` in every string leaf of a JSON value."""
    if isinstance(value, str):
        return pattern.sub(repl, value)
    if isinstance(value, list):
        return [_sub(v, pattern, repl) for v in value]
    if isinstance(value, dict):
        return {k: _sub(v, pattern, repl) for k, v in value.items()}
    return value


def corrupt(item: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The item's reference broken in one way the gate must catch, or None when `kind` does not
    apply to it (no number to drop, not an encoding, ...)."""
    ref, task = copy.deepcopy(item["reference"]), item["task"]
    must = item["must_contain"]
    if kind == "drop_number":
        nums = [t for t in must if match.kind(t) == "number"]
        if not nums:
            return None
        for t in nums:  # drop every number: more than any tolerance allows
            ref = _sub(ref, re.compile(rf"(?<![\w.]){re.escape(t)}(?![\d])"), "several")
        return ref
    if kind == "change_ref":
        refs = [t for t in must if match.kind(t) == "ref"]
        if not refs:
            return None
        line = int(refs[0].rsplit(":", 1)[1])
        return _sub(ref, match.ref_pattern(refs[0]), rf"\g<1>{line + 1}")
    if kind == "fabricate_person":
        if not item["must_not_fabricate"]:
            return None
        name = item["must_not_fabricate"][0]
        key = {"encoding": "narrative", "retrieval_synthesis": "answer", "principle_abstraction": "principle",
               "episode_summarization": "title"}[task]
        if task == "principle_abstraction" and not ref["has_principle"]:
            return None
        ref[key] = (f"{name}: " + ref[key])[:60] if key == "title" else ref[key] + f" {name} confirmed this."
        return ref
    if kind == "missed_refusal":
        if not item["expect_refusal"]:
            return None
        if task == "principle_abstraction":
            return {"has_principle": True, "title": "Be careful with changes",
                    "principle": "Changes can break things, so be careful.", "concepts": ["care"], "confidence": 0.6}
        return {**ref, "cited": ["M1"]}
    if task != "encoding":
        return None
    if kind == "long_gist":
        ref["gist"] = (ref["gist"] + " " + "x" * 80)[:81]
    elif kind == "salience_high":
        ref["salience"] = 1.2
    elif kind == "bad_enum":
        ref["significance"] = "huge"
    elif kind == "placeholder_gist":
        ref["gist"] = "<gist>"
    elif kind == "empty_content":
        ref["content"] = "  "
    else:
        raise KeyError(f"unknown corruption {kind!r}")
    return ref


if __name__ == "__main__":
    for set_name, path in write_sets().items():
        print(f"{set_name}: {len(load_set(set_name))} items -> {path}", file=sys.stderr)
