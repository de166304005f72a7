"""Teacher harvest for the task suite: items x teachers -> judged answers in the store.

Every answer goes through the faithfulness gate: unparseable, schema-invalid or truncated answers
count as malformed and are asked again (up to `retry.max_attempts`); well-formed answers are kept with
the gate's verdict, so exports can take only the ones that pass.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from felix.errors import FelixError
from felix.harvest_config import HarvestConfig, TeacherConfig
from felix.harvest_runner import Harvester, Judgement
from felix.harvest_store import HarvestStore, Job, request_key
from felix.jsonl import json_objects
from felix.tasks import prompts
from felix.tasks.gate import Truth, Verdict, check
from felix.tasks.schemas import TASKS
from felix.tasks.simulate import CATEGORIES, simulate
from felix.tasks.suite import load_set
from felix.teachers import Completion

TRUTH_FIELDS = ("must_contain", "must_not_fabricate", "expect_refusal", "expect")


def load_items(cfg: HarvestConfig) -> list[dict[str, Any]]:
    """The task items the config names, in order, without duplicate ids; filtered to `cfg.tasks`."""
    items: list[dict[str, Any]] = []
    for src in cfg.items:
        if src.set is not None:
            items.extend(load_set(src.set))
        elif src.file is not None:
            path = cfg.resolve(src.file)
            if not path.is_file():
                raise FelixError(f"items file not found: {path}")
            for n, rec in json_objects(path):  # errors name `path:line`, as the checks below do
                missing = [k for k in ("id", "task", "input") if k not in rec]
                if missing:
                    raise FelixError(f"{path}:{n}: item lacks {', '.join(missing)}")
                if rec["task"] not in TASKS:
                    raise FelixError(f"{path}:{n}: unknown task {rec['task']!r}; expected one of {', '.join(TASKS)}")
                if problem := prompts.input_problem(rec["task"], rec["input"]):
                    raise FelixError(f"{path}:{n}: {problem}")
                items.append(rec)
        else:
            sim = src.simulate or {}
            seed, n = sim.get("seed", 0), sim.get("per_category", 2)
            for task in TASKS:
                for cat in CATEGORIES:
                    count = n + n % 2 if cat == "adversarial_twin" else n  # twins come in pairs
                    items.extend(d.item for d in simulate(task, cat, seed, count, prefix=f"sim{seed}"))
    if cfg.tasks is not None:
        items = [it for it in items if it["task"] in cfg.tasks]
    seen: set[str] = set()
    for it in items:
        if it["id"] in seen:
            raise FelixError(f"item id {it['id']!r} appears twice in the configured items")
        seen.add(it["id"])
    return items


def task_job(item: dict[str, Any], teacher: TeacherConfig) -> Job:
    """The request for one item to one teacher; keyed by everything that shapes the answer."""
    task = item["task"]
    system, user = prompts.render(task, item["input"])
    version = prompts.PROMPT_VERSION[task]
    key = request_key(kind="harvest", task=task, input=item["input"], teacher=teacher.identity, prompt_version=version,
                      system=system, user=user, max_tokens=teacher.max_tokens, temperature=teacher.temperature,
                      **({"json_mode": True} if teacher.json_mode else {}))
    truth = {k: item[k] for k in TRUTH_FIELDS if k in item}
    return Job(key, "harvest", task, item["id"], teacher.name, teacher.identity, version, system, user,
               item["input"], truth or None)


def verdict_json(v: Verdict) -> dict[str, Any]:
    """The gate's verdict as stored beside an answer."""
    return {"passed": v.passed, "schema_valid": v.schema_valid, "fabricated": v.fabricated, "required": v.required,
            "preserved": v.preserved, "findings": [asdict(f) for f in v.findings]}


def judge_task(job: Job, c: Completion) -> Judgement:
    """Malformed (ask again) when truncated, unparseable or schema-invalid; else kept with the gate's verdict."""
    truth = Truth.of(job.meta) if job.meta else None
    v = check(job.task, job.input, c.text, truth)
    gate = verdict_json(v)
    if c.truncated:
        return Judgement(False, v.output, gate, False, f"truncated at max_tokens ({c.output_tokens} tokens)")
    if not v.schema_valid:
        errors = [f"{f.code}: {f.message}" for f in v.findings if f.level == "L1"]
        return Judgement(False, v.output, gate, False, "malformed: " + "; ".join(errors)[:800])
    failed = [f.code for f in v.findings if f.severity == "error"]
    return Judgement(True, v.output, gate, v.passed, ("gate: " + ", ".join(failed)) if failed else None)


def teacher_secrets(cfg: HarvestConfig) -> list[str]:
    """Every configured key's value as sent (stripped, `TeacherConfig.api_key`), so error texts can be
    scrubbed of them."""
    return [os.environ.get(t.api_key_env, "").strip() for t in cfg.teachers if t.api_key_env]


def configured_keys(cfg: HarvestConfig) -> set[str]:
    """The request keys `felix harvest` asks under `cfg` now: every configured item and teacher, with the
    current prompts and sampling settings."""
    items = load_items(cfg)
    return {task_job(it, t).key for t in cfg.teachers for it in items}


def run_harvest(cfg: HarvestConfig, *, teachers: list[str] | None = None, limit: int | None = None,
                retry_failed: bool = False, progress: bool = True) -> dict[str, Any]:
    """Harvest every configured item from every (or the named) teacher; returns the run's summary.

    Stopped by Ctrl-C or SIGTERM, it raises the KeyboardInterrupt with what it did so far (the same object,
    with "interrupted") as its `partial` attribute, as `run_synth` does."""
    items = load_items(cfg)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise FelixError("no items to harvest: the config's `items` section is empty (or filtered out by `tasks`)")
    chosen = [cfg.teacher(n) for n in teachers] if teachers else cfg.teachers
    jobs = (task_job(it, t) for t in chosen for it in items)  # made as registered: only the owed ones are kept
    result: dict[str, Any] = {"store": str(cfg.store_path), "items": len(items), "teachers": [t.name for t in chosen],
                              "requests": len(items) * len(chosen), "interrupted": None}
    with HarvestStore(cfg.store_path) as store:
        result["reset"] = store.reset_gave_up("harvest") if retry_failed else 0
        harvester = Harvester(cfg, store, judge_task, secrets=teacher_secrets(cfg), progress=progress)
        try:
            return harvester.run_into(result, jobs, "harvest")
        finally:
            result["reasons"] = store.failure_reasons("harvest")


def stored_answers(store: HarvestStore, kind: str = "harvest", order: str = "teacher, task, item_id"
                   ) -> Iterator[dict[str, Any]]:
    """Every answered request with its prompt, parsed output and gate verdict, streamed in `order` (SQL)."""
    for r in store.rows(kind, "ok", order=order):
        req = json.loads(r["request"])
        yield {"key": r["key"], "task": r["task"], "item_id": r["item_id"], "teacher": r["teacher"],
               "prompt_version": r["prompt_version"], "system": req["system"], "user": req["user"],
               "input": req.get("input"), "text": r["text"],
               "output": json.loads(r["output"]) if r["output"] else None,
               "gate": json.loads(r["gate"]) if r["gate"] else None, "passed": bool(r["passed"])}
