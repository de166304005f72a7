"""What a harvest produced: training JSONL per task and teacher, and a comparison of teachers."""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable
from itertools import combinations
from pathlib import Path
from typing import Any

from felix.atomic import atomic_write_text
from felix.harvest import stored_answers
from felix.harvest_store import HarvestStore
from felix.tasks.gate import is_refusal

_WORD = re.compile(r"\w+")


def _slug(identity: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", identity).strip("_")


def export_names(identities: Iterable[str]) -> dict[str, str]:
    """A file stem per teacher identity: its slug, or where two identities share one (`openai:a/b`,
    `openai:a_b`) the slug and a hash of the identity, so no teacher's answers overwrite another's."""
    by_slug: dict[str, list[str]] = defaultdict(list)
    for identity in sorted(set(identities)):
        by_slug[_slug(identity)].append(identity)
    return {identity: slug if len(group) == 1 else f"{slug}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"
            for slug, group in by_slug.items() for identity in group}


def training_record(a: dict[str, Any]) -> dict[str, Any]:
    """One chat-format training example: the prompt and the teacher's answer as canonical JSON."""
    answer = json.dumps(a["output"], ensure_ascii=False)
    return {"id": a["item_id"], "task": a["task"], "teacher": a["teacher"], "prompt_version": a["prompt_version"],
            "messages": [{"role": "system", "content": a["system"]}, {"role": "user", "content": a["user"]},
                         {"role": "assistant", "content": answer}],
            "gate_passed": a["passed"]}


def export_training(store: HarvestStore, out_dir: Path, keys: set[str], include_failing: bool = False
                    ) -> dict[str, Any]:
    """Write `<out>/<task>/<teacher>.jsonl` from the answers to the requests in `keys` (`harvest.configured_keys`;
    gate-passing ones unless `include_failing`); returns counts."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    skipped = other = 0
    for a in stored_answers(store):
        # Answers under earlier settings or from teachers no longer configured would give an item a second,
        # stale example (or a teacher nobody asked for).
        if a["key"] not in keys:
            other += 1
        elif a["passed"] or include_failing:
            groups[(a["task"], a["teacher"])].append(training_record(a))
        else:
            skipped += 1
    files = {}
    names = export_names(teacher for _, teacher in groups)
    for (task, teacher), recs in sorted(groups.items()):
        path = out_dir / task / f"{names[teacher]}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        recs.sort(key=lambda r: r["id"])
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
        files[str(path)] = len(recs)
    return {"files": files, "written": sum(files.values()), "skipped_failing": skipped, "not_in_config": other}


def decision(task: str, out: dict[str, Any]) -> Any:
    """The part of an answer two teachers should agree on: refusal for the tasks that can refuse, the
    enums for encoding, salience in fifths for episodes."""
    if task == "encoding":
        return tuple(out.get(k) for k in ("significance", "emotional_tone", "outcome"))
    if task == "episode_summarization":
        s = out.get("salience")
        # A store written before the gate rejected NaN may still hold one.
        return round(s * 5) if isinstance(s, int | float) and math.isfinite(s) else None
    return is_refusal(task, out)


def _jaccard(a: str, b: str) -> float:
    wa, wb = set(_WORD.findall(a.lower())), set(_WORD.findall(b.lower()))
    return len(wa & wb) / len(wa | wb) if wa | wb else 1.0


def compare_teachers(store: HarvestStore, keys: set[str]) -> dict[str, Any]:
    """Per teacher: answers, gate pass rate, output length; per pair: decision agreement and word overlap;
    over the answers to the requests in `keys` (`harvest.configured_keys`), as `export_training` takes."""
    by_teacher: dict[str, dict[tuple[str, str], dict[str, Any]]] = defaultdict(dict)
    other = 0
    for a in stored_answers(store):
        # As in export: an answer under earlier settings would compete with the current one for the item's slot,
        # and a teacher no longer configured would be compared.
        if a["key"] not in keys:
            other += 1
            continue
        by_teacher[a["teacher"]][(a["task"], a["item_id"])] = a
    totals = store.totals("harvest")
    teachers: dict[str, Any] = {}
    for t, got in sorted(by_teacher.items()):
        lengths = [len(a["text"] or "") for a in got.values()]
        teachers[t] = {"answered": len(got), "gate_pass_rate": round(sum(a["passed"] for a in got.values())
                                                                      / len(got), 4),
                       "median_chars": statistics.median(lengths), "cost_usd": totals.get(t, {}).get("cost_usd", 0.0),
                       "gave_up": totals.get(t, {}).get("gave_up", 0)}
    pairs = []
    for a, b in combinations(sorted(by_teacher), 2):
        shared = sorted(set(by_teacher[a]) & set(by_teacher[b]))
        if not shared:
            pairs.append({"teachers": [a, b], "shared": 0})
            continue
        agree, overlap, both_pass = 0, [], 0
        per_task: dict[str, list[bool]] = defaultdict(list)
        for k in shared:
            x, y = by_teacher[a][k], by_teacher[b][k]
            same = decision(k[0], x["output"]) == decision(k[0], y["output"])
            agree += same
            per_task[k[0]].append(same)
            overlap.append(_jaccard(json.dumps(x["output"]), json.dumps(y["output"])))
            both_pass += x["passed"] and y["passed"]
        pairs.append({"teachers": [a, b], "shared": len(shared), "decision_agreement": round(agree / len(shared), 4),
                      "agreement_by_task": {t: round(sum(v) / len(v), 4) for t, v in sorted(per_task.items())},
                      "mean_word_overlap": round(statistics.fmean(overlap), 4),
                      "both_pass_rate": round(both_pass / len(shared), 4)})
    return {"teachers": teachers, "pairs": pairs, "not_in_config": other}
