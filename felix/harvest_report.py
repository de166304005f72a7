"""What a harvest produced: chat-format JSONL per task and teacher (sharded by `felix data shard` into a mix
source), and a comparison of teachers."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable
from itertools import combinations
from pathlib import Path, PurePosixPath
from typing import Any

from felix.atomic import atomic_path, atomic_write_text
from felix.errors import FelixError
from felix.harvest import stored_answers
from felix.harvest_store import HarvestStore
from felix.tasks.gate import is_refusal

_WORD = re.compile(r"\w+")
# In an export's --out: the files it wrote, so the next export into the same directory removes the ones it no
# longer writes (a teacher or task left out of the config) and nothing else there.
EXPORT_MANIFEST = "harvest-export.json"


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


def _exported_before(out_dir: Path) -> set[str]:
    """The `<task>/<name>.jsonl` files (relative to `out_dir`) its manifest says an earlier export wrote; an entry
    of any other shape is ignored, so an edited manifest cannot name a file outside those an export writes."""
    path = out_dir / EXPORT_MANIFEST
    if not path.is_file():
        return set()
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))["files"]
        if not isinstance(listed, list):
            raise TypeError("'files' is not a list")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise FelixError(f"{path}: unreadable export manifest ({exc}); it lists the files an earlier export "
                         "wrote, for this one to replace: remove those by hand, and the manifest") from None
    return {f for f in listed if isinstance(f, str) and len(PurePosixPath(f).parts) == 2
            and not {".", ".."} & set(PurePosixPath(f).parts) and f.endswith(".jsonl")}


def _write_manifest(out_dir: Path, files: set[str]) -> None:
    atomic_write_text(out_dir / EXPORT_MANIFEST, json.dumps({"written_by": "felix harvest export",
                                                             "files": sorted(files)}, indent=1) + "\n")


def export_training(store: HarvestStore, out_dir: Path, keys: set[str], include_failing: bool = False
                    ) -> dict[str, Any]:
    """Write `<out>/<task>/<teacher>.jsonl` from the answers to the requests in `keys` (`harvest.configured_keys`;
    gate-passing ones unless `include_failing`); returns counts.

    A file an earlier export into `out_dir` wrote (listed in its `EXPORT_MANIFEST`) that this one does not
    write is removed, so `<out>/*/*.jsonl` is this export only (what `felix data shard` is given); files export
    did not write are left alone, and the `<task>/*.jsonl` among them are reported as `unlisted`.

    The answers are streamed, a file at a time, in one read snapshot of the store: a first pass over the small
    columns finds the files, a second writes them (they were held whole, prompts included: 10 KB an answer)."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    skipped = other = 0
    with store.snapshot():
        for r in store.rows("harvest", "ok", columns="key, task, teacher, passed"):
            # Answers under earlier settings or from teachers no longer configured would give an item a second,
            # stale example (or a teacher nobody asked for).
            if r["key"] not in keys:
                other += 1
            elif r["passed"] or include_failing:
                counts[(r["task"], r["teacher"])] += 1
            else:
                skipped += 1
        names = export_names(teacher for _, teacher in counts)
        owned = {f"{task}/{names[teacher]}.jsonl": n for (task, teacher), n in counts.items()}
        before = _exported_before(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # Listed before any is written: however this export stops, the next one knows every file it may have left.
        _write_manifest(out_dir, before | set(owned))
        # By task, teacher and item id: each file's records come together, sorted by id.
        answers = (a for a in stored_answers(store, order="task, teacher, item_id")
                   if a["key"] in keys and (a["passed"] or include_failing))
        for (task, teacher), group in itertools.groupby(answers, key=lambda a: (a["task"], a["teacher"])):
            path = out_dir / task / f"{names[teacher]}.jsonl"
            path.parent.mkdir(exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                for a in group:
                    f.write(json.dumps(training_record(a), ensure_ascii=False) + "\n")
    files = {str(out_dir / rel): n for rel, n in sorted(owned.items())}
    removed = []
    for rel in sorted(before - set(owned)):
        path = out_dir / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(str(path))
        with contextlib.suppress(OSError):  # a task directory this left empty; one holding anything stays
            path.parent.rmdir()
    _write_manifest(out_dir, set(owned))
    unlisted = sorted(str(f) for f in out_dir.glob("*/*.jsonl") if f.relative_to(out_dir).as_posix() not in owned)
    return {"files": files, "written": sum(files.values()), "skipped_failing": skipped, "not_in_config": other,
            "removed": removed, "unlisted": unlisted}


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
    with store.snapshot():
        # What is compared, not the prompts: held for every answer, they took most of the memory.
        for r in store.rows("harvest", "ok", columns="key, task, item_id, teacher, text, output, passed"):
            # As in export: an answer under earlier settings would compete with the current one for the item's
            # slot, and a teacher no longer configured would be compared.
            if r["key"] not in keys:
                other += 1
                continue
            by_teacher[r["teacher"]][(r["task"], r["item_id"])] = {
                "chars": len(r["text"] or ""), "output": json.loads(r["output"]) if r["output"] else None,
                "passed": bool(r["passed"])}
        totals = store.totals("harvest")
    teachers: dict[str, Any] = {}
    for t, got in sorted(by_teacher.items()):
        lengths = [a["chars"] for a in got.values()]
        teachers[t] = {"answered": len(got), "gate_pass_rate": round(sum(a["passed"] for a in got.values())
                                                                      / len(got), 4),
                       # float whatever the count (the median of an even count of ints is a float)
                       "median_chars": float(statistics.median(lengths)),
                       "cost_usd": totals.get(t, {}).get("cost_usd", 0.0),
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
