"""Task items with ground truth, deterministic from a seed.

`simulate(task, category, seed, n)` returns `n` drafts: the item (id, task, category, input,
prompt_version and the ground-truth fields) and the facts its gold answer is built from. Each item
draws from `random.Random(f"{seed}/{task}/{category}/{i}")`, so one item never shifts another.

Ground truth per item:
- `must_contain`: tokens a faithful answer keeps (numbers, basename:line refs, short hashes, names);
- `must_not_fabricate`: tokens absent from the input that a faithful answer never shows (team members
  not in the input; for adversarial twins, the sibling's distinguishing tokens);
- `expect_refusal`: whether the right answer is a refusal (`has_principle: false`, or `cited: []`);
- `expect`: exact field values the answer must have (the outcome of a twin capture);
- `twin_of`: the id of the adversarial twin.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from felix.tasks import events, scenarios
from felix.tasks.match import mentions
from felix.tasks.prompts import PROMPT_VERSION
from felix.tasks.world import ROSTER, Event, absent

CATEGORIES = ("capture", "out_of_domain", "adversarial_twin", "minimal", "dense_number")
TASK_ABBR = {"encoding": "enc", "retrieval_synthesis": "ret", "principle_abstraction": "pri",
             "episode_summarization": "epi"}
ABSENT_QUESTIONS = [("What did we decide about the office parking rota?", "the office parking rota"),
                    ("When is the team offsite, and where?", "a team offsite"),
                    ("How did the Kafka upgrade go?", "a Kafka upgrade"),
                    ("What is the guest Wi-Fi password?", "the guest Wi-Fi password")]


@dataclass
class Draft:
    """An item without its reference, and the facts the reference is built from."""

    item: dict[str, Any]
    truth: dict[str, Any]


def _input_text(inp: Any) -> str:
    if isinstance(inp, str):
        return inp
    return "\n".join([inp.get("question", ""), *(m["text"] for m in inp["memories"])])


def _people_in(text: str) -> list[str]:
    return [f for f, _ in ROSTER if mentions(text, f)]


def _fields(task: str, inp: Any, must: list[str], truth: dict[str, Any], *, refusal: bool = False,
            expect: dict[str, Any] | None = None, extra_absent: list[str] | None = None,
            rng: random.Random) -> Draft:
    text = _input_text(inp)
    mnf = absent(rng, _people_in(text)) + [t for t in (extra_absent or []) if not mentions(text, t)]
    item = {"task": task, "input": inp, "prompt_version": PROMPT_VERSION[task], "must_contain": must,
            "must_not_fabricate": sorted(set(mnf)), "expect_refusal": refusal, "expect": expect or {},
            "twin_of": None}
    return Draft(item, truth)


def _memories(texts: list[str]) -> list[dict[str, str]]:
    return [{"id": f"M{i + 1}", "text": t} for i, t in enumerate(texts)]


def _encoding(cat: str, rng: random.Random, seed: str) -> list[Draft]:
    if cat == "adversarial_twin":
        a, b = (events.verify_run(random.Random(seed), passed) for passed in (True, False))
        return [_fields("encoding", ev.capture, ev.must, ev.truth, expect={"outcome": ev.truth["outcome"]},
                        extra_absent=other.must, rng=rng) for ev, other in ((a, b), (b, a))]
    gen = {"capture": lambda r: events.GENERATORS[r.choice(["crash", "commit", "chat", "review"])](r),
           "out_of_domain": events.note, "minimal": events.minimal, "dense_number": events.bench}[cat]
    ev: Event = gen(rng)
    return [_fields("encoding", ev.capture, ev.must, ev.truth, rng=rng)]


def _fresh(kind: str, rng: random.Random, avoid: list[str]) -> Event:
    """An event of `kind` whose memory mentions none of `avoid`: a distractor that cannot answer
    (or muddy) a question about another project."""
    while True:
        ev = events.GENERATORS[kind](rng)
        if not any(mentions(ev.memory, a) for a in avoid):
            return ev


def _distractors(rng: random.Random, k: int, exclude: str, avoid: list[str]) -> list[Event]:
    kinds = [g for g in sorted(events.GENERATORS) if g != exclude]
    return [_fresh(g, rng, avoid) for g in rng.sample(kinds, k)]


def _answer_truth(target: Event | None, cited: str | None, others: list[Event], missing: str = "") -> dict[str, Any]:
    if target is None:
        topics = " and ".join(e.topic for e in others[:2])
        return {"answer": [f"None of the retrieved memories mention {missing}.",
                           f"They cover {topics}, so this cannot be answered from them."], "cited": []}
    return {"answer": target.answer, "cited": [cited]}


def _retrieval(cat: str, rng: random.Random, seed: str) -> list[Draft]:
    task = "retrieval_synthesis"
    if cat == "minimal":
        a, b = events.minimal(rng), events.minimal(rng)
        while b.capture == a.capture:
            b = events.minimal(rng)
        order = rng.sample([a, b], 2)
        tid = f"M{order.index(a) + 1}"
        inp = {"question": f"Any news on {a.topic}?", "memories": _memories([e.memory for e in order])}
        truth = {"answer": [f"Yes: the memory says \"{a.capture}\".", "Nothing more was recorded about it."],
                 "cited": [tid]}
        return [_fields(task, inp, a.must, truth, rng=rng)]
    if cat == "out_of_domain":
        others = _distractors(rng, 3, exclude="", avoid=[])
        question, missing = rng.choice(ABSENT_QUESTIONS)
        inp = {"question": question, "memories": _memories([e.memory for e in others])}
        return [_fields(task, inp, [], _answer_truth(None, None, others, missing), refusal=True, rng=rng)]
    kind = "bench" if cat == "dense_number" else rng.choice(sorted(events.GENERATORS))
    target = events.GENERATORS[kind](rng)
    others = _distractors(rng, 2, exclude=kind, avoid=target.scope)
    pos = rng.randrange(3)
    texts = [e.memory for e in others]
    texts.insert(pos, target.memory)
    inp = {"question": target.question, "memories": _memories(texts)}
    if cat != "adversarial_twin":
        return [_fields(task, inp, target.answer_must, _answer_truth(target, f"M{pos + 1}", others), rng=rng)]
    # Twin: the same question and distractors, but the answering memory swapped for another event
    # of the same kind; only the first can be answered.
    swap = _fresh(kind, rng, avoid=[*target.scope, *target.answer_must])
    texts_b = list(texts)
    texts_b[pos] = swap.memory
    inp_b = {"question": target.question, "memories": _memories(texts_b)}
    missing = target.topic
    return [_fields(task, inp, target.answer_must, _answer_truth(target, f"M{pos + 1}", others),
                    extra_absent=swap.answer_must, rng=rng),
            _fields(task, inp_b, [], _answer_truth(None, None, [swap, *others], missing), refusal=True,
                    extra_absent=target.answer_must, rng=rng)]


def _principle(cat: str, rng: random.Random, seed: str) -> list[Draft]:
    task = "principle_abstraction"
    fams = scenarios.FAMILIES
    if cat in ("capture", "dense_number"):
        fam = rng.choice(fams)
        texts = [scenarios.instance(rng, fam, dense=cat == "dense_number")[0] for _ in range(3)]
        truth = scenarios.principle_truth(fam, 0.7 + rng.randrange(0, 23) / 100, rng.randrange(2))
        return [_fields(task, {"memories": _memories(texts)}, [fam.key], truth, rng=rng)]
    if cat == "out_of_domain":
        notes: list[str] = []
        while len(notes) < 3:
            text = events.note(rng).capture
            if text.split(" ")[0] not in {n.split(" ")[0] for n in notes}:
                notes.append(text)
        return [_fields(task, {"memories": _memories(notes)}, [], scenarios.principle_truth(None, 0.1), refusal=True,
                        rng=rng)]
    if cat == "minimal":
        if int(seed.rsplit("/", 1)[1]) % 2 == 0:
            texts = [events.minimal(rng).capture, events.minimal(rng).capture]
            return [_fields(task, {"memories": _memories(texts)}, [], scenarios.principle_truth(None, 0.05),
                            refusal=True, rng=rng)]
        fam, texts = scenarios.terse_pair(rng)
        return [_fields(task, {"memories": _memories(texts)}, [fam.key],
                        scenarios.principle_truth(fam, 0.5 + rng.randrange(0, 11) / 100, rng.randrange(2)), rng=rng)]
    # Twins: the same three incidents (services, people, numbers: each slot draws from its own seed);
    # in (a) all three share the family's cause, in (b) two carry unrelated decoy causes instead.
    fam = rng.choice(fams)
    decoys = rng.sample([1, 2, 3], 2)
    same = [scenarios.instance(random.Random(f"{seed}/slot{j}"), fam)[0] for j in range(3)]
    mixed = [same[0]] + [scenarios.instance(random.Random(f"{seed}/slot{j + 1}"), fam, decoy=d)[0]
                         for j, d in enumerate(decoys)]
    truth = scenarios.principle_truth(fam, 0.7 + rng.randrange(0, 23) / 100, rng.randrange(2))
    return [_fields(task, {"memories": _memories(same)}, [fam.key], truth, rng=rng),
            _fields(task, {"memories": _memories(mixed)}, [], scenarios.principle_truth(None, 0.15), refusal=True,
                    rng=rng)]


def _episode(cat: str, rng: random.Random, seed: str) -> list[Draft]:
    task = "episode_summarization"

    def draft(tl: scenarios.Timeline, extra: list[str] | None = None) -> Draft:
        truth = {"title": tl.title, "summary": tl.summary, "concepts": tl.concepts, "salience": tl.salience}
        return _fields(task, tl.text, tl.must, truth, extra_absent=extra, rng=rng)

    if cat == "adversarial_twin":
        a, b = (scenarios.incident(random.Random(seed), end) for end in ("resolved", "rolled_back"))
        return [draft(a, b.must), draft(b, a.must)]
    gen = {"capture": lambda r: scenarios.incident(r, r.choice(["resolved", "rolled_back"])),
           "out_of_domain": scenarios.personal, "minimal": scenarios.terse, "dense_number": scenarios.rollout}[cat]
    return [draft(gen(rng))]


BUILDERS = {"encoding": _encoding, "retrieval_synthesis": _retrieval, "principle_abstraction": _principle,
            "episode_summarization": _episode}


def simulate(task: str, category: str, seed: int | str, n: int, prefix: str = "sim") -> list[Draft]:
    """`n` drafts of `task` in `category` (twins come in pairs, so `n` must be even for them)."""
    if category not in CATEGORIES:
        raise KeyError(f"unknown category {category!r}; expected one of {', '.join(CATEGORIES)}")
    drafts: list[Draft] = []
    i = 0
    while len(drafts) < n:
        key = f"{seed}/{task}/{category}/{i}"
        made = BUILDERS[task](category, random.Random(key), key)
        base = f"{prefix}-{TASK_ABBR[task]}-{category}-{i:02d}"
        ids = [base] if len(made) == 1 else [f"{base}{c}" for c in "ab"]
        for d, item_id in zip(made, ids, strict=True):
            d.item = {"id": item_id, "task": task, "category": category, **d.item}
            if len(made) == 2:
                d.item["twin_of"] = ids[1] if item_id == ids[0] else ids[0]
        drafts.extend(made)
        i += 1
    return drafts[:n]
