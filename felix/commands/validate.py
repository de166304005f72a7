"""`felix validate`: run the faithfulness gate over a JSONL file of task outputs."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from felix.cli import print_json
from felix.commands.arg_types import add_json_flag
from felix.errors import FelixError


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser(
        "validate", help=help,
        description="Check a JSONL file of task outputs. Each line is an object with \"task\", \"output\" (a raw "
                    "completion string or the parsed object) and either \"input\" or the \"id\" of a shipped item "
                    "(whose ground truth is then used). Lines may also carry must_contain, must_not_fabricate, "
                    "expect_refusal and expect. Exit status 1 when any item fails L1 or L2.")
    p.add_argument("file", help="JSONL file of outputs")
    p.add_argument("--task", help="the task of every line (lines may then omit \"task\")")
    add_json_flag(p)
    p.set_defaults(func=run)


def _truth_problem(rec: dict[str, Any]) -> str | None:
    """Why a line's own ground-truth fields have the wrong type, or None. The gate takes `list(...)` of
    them, so a bare string would silently become one check per character."""
    for key in ("must_contain", "must_not_fabricate"):
        v = rec.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(t, str) for t in v)):
            return f"\"{key}\" must be a list of strings, got {json.dumps(v)}"
    if not isinstance(rec.get("expect_refusal"), bool | None):
        return f"\"expect_refusal\" must be true, false or null, got {json.dumps(rec['expect_refusal'])}"
    if not isinstance(rec.get("expect"), dict | None):
        return f"\"expect\" must be an object of field values, got {json.dumps(rec['expect'])}"
    return None


def _records(path: Path, task: str | None) -> list[tuple[int, dict[str, Any]]]:
    """(line number, normalized record) per non-empty line; FelixError naming file:line on bad input."""
    from felix.jsonl import json_objects
    from felix.tasks.prompts import input_problem
    from felix.tasks.schemas import TASKS
    from felix.tasks.suite import shipped_index

    if not path.exists():
        raise FelixError(f"{path}: no such file")
    out = []
    for n, rec in json_objects(path):
        shipped = shipped_index().get(rec["id"]) if isinstance(rec.get("id"), str) else None
        if "input" not in rec and shipped is None:
            why = f"unknown id {rec['id']!r}" if "id" in rec else "no \"input\" and no \"id\""
            raise FelixError(f"{path}:{n}: {why}")
        rec_task = rec.get("task") or (shipped or {}).get("task") or task
        if rec_task is None:
            raise FelixError(f"{path}:{n}: no \"task\" (give it per line or with --task)")
        if rec_task not in TASKS:
            raise FelixError(f"{path}:{n}: unknown task {rec_task!r}; expected one of {', '.join(TASKS)}")
        if task is not None and rec_task != task:
            raise FelixError(f"{path}:{n}: task {rec_task!r} differs from --task {task}")
        if "output" not in rec:
            raise FelixError(f"{path}:{n}: no \"output\"")
        if problem := _truth_problem(rec):
            raise FelixError(f"{path}:{n}: {problem}")
        if shipped is not None and "input" in rec and rec["input"] != shipped["input"]:
            raise FelixError(f"{path}:{n}: \"input\" differs from shipped item {rec['id']!r}; drop one of them")
        base = dict(shipped) if shipped is not None else {}
        if shipped is not None and shipped["task"] != rec_task:
            raise FelixError(f"{path}:{n}: id {rec['id']!r} is a {shipped['task']} item, not {rec_task}")
        base.update({k: v for k, v in rec.items() if k != "reference"})
        base["task"] = rec_task
        if problem := input_problem(rec_task, base["input"]):
            raise FelixError(f"{path}:{n}: {problem}")
        base.setdefault("id", f"line-{n}")
        out.append((n, base))
    if not out:
        raise FelixError(f"{path}: no items ({'only blank lines' if path.stat().st_size else 'the file is empty'})")
    return out


def _id_findings(records: list[tuple[int, dict[str, Any]]], task: str | None) -> list[dict[str, Any]]:
    """L3 warnings about the file's ids: one given on several lines (each line counts in the rates), and the
    items of a shipped set the file draws on that it leaves out (the rates cover only those given)."""
    from felix.tasks.suite import SETS, load_set

    lines: dict[str, list[int]] = defaultdict(list)
    for n, r in records:
        lines[str(r["id"])].append(n)
    found: list[dict[str, Any]] = []
    for rid, ns in lines.items():
        if len(ns) > 1:
            found.append({"code": "duplicate_id", "items": [rid], "lines": ns, "message":
                          f"{rid} is on {len(ns)} lines ({', '.join(map(str, ns))}); each counts in the rates"})
    for name in SETS:
        ids = [it["id"] for it in load_set(name) if task is None or it["task"] == task]
        missing = [i for i in ids if i not in lines]
        if 0 < len(missing) < len(ids):
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            found.append({"code": "missing_items", "set": name, "items": missing, "message":
                          f"{len(missing)} of the {len(ids)} {name} items{f' ({task})' if task else ''} are not in "
                          f"the file ({shown}); the rates cover the {len(ids) - len(missing)} given"})
    return found


def run(args: argparse.Namespace) -> int:
    from felix.tasks.gate import Truth, check, dataset_health

    path = Path(args.file)
    records = _records(path, args.task)
    verdicts = [check(r["task"], r["input"], r["output"], Truth.of(r)) for _, r in records]
    health = dataset_health(verdicts, [r["input"] for _, r in records], [str(r["id"]) for _, r in records])
    health["findings"].extend(_id_findings(records, args.task))
    items = [{"line": n, "id": r["id"], "task": r["task"], "passed": v.passed, "schema_valid": v.schema_valid,
              "findings": [{"level": f.level, "code": f.code, "severity": f.severity, "message": f.message}
                           for f in v.findings]}
             for (n, r), v in zip(records, verdicts, strict=True)]
    s = health["summary"] | {"dataset_warnings": len(health["findings"])}  # `warnings` counts the items' own
    if args.json:
        print_json({"file": str(path), "summary": s, "items": items,
                    "dataset": {"findings": health["findings"], "tasks": health["tasks"]}})
    else:
        for it in items:
            if not it["findings"]:
                continue
            status = "PASS" if it["passed"] else "FAIL"
            print(f"{status}  {path}:{it['line']}  {it['id']}  ({it['task']})")
            for f in it["findings"]:
                print(f"      {f['level']} {f['severity']:5s} {f['code']}: {f['message']}")
        for f in health["findings"]:
            print(f"L3 warn {f['code']}: {f['message']}")
        print(f"{s['items']} items: {s['items'] - s['hard_failures']} passed, {s['hard_failures']} failed; warnings: "
              f"{s['warnings']} on items, {s['dataset_warnings']} on the file (L3)")
        print("  ".join(f"{k} {'n/a' if s[k] is None else format(s[k], '.3f')}"
                        for k in ("schema_valid_rate", "entity_preservation_rate", "fabrication_rate", "pass_rate")))
    return 1 if s["hard_failures"] else 0
