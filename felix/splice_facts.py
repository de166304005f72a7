"""The demo edit set from the `facts` source: CounterFact-style counterfactuals of facts the model holds.

A fact (`felix.facts`) is stated by several templates. It is *held* when the model greedily completes its
object after at least one template's prompt. An edit takes one held template as its prompt and another
object of the same relation as its target; the fact's other templates are its paraphrases; its neutral
prompts are other held facts, half of the same relation (the edit's neighbours: another subject) and half
of other relations, each in a held template drawn at random (the edit's own only by chance).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from felix.errors import FelixError
from felix.facts import TEMPLATES, Fact
from felix.splice_data import too_few_facts
from felix.splice_edit import EditRequest
from felix.splice_examples import greedy_hits, make_example

log = logging.getLogger(__name__)


def held_prompts(model, tok, facts: list[Fact], max_target_tokens: int = 4, shares=None,
                 max_habit: float = 1.0) -> dict[Fact, list[str]]:
    """Per fact, the templates after whose prompt the model greedily gives the object (a target of at most
    `max_target_tokens` tokens; with `shares`, one whose first token follows the prompt's last token in
    under `max_habit` of the training text's occurrences). Facts held by no template are left out."""
    cases = [(f, t) for f in facts for t in TEMPLATES[f.relation]]
    examples = [make_example(tok, *f.prompt(t), model.cfg.max_seq_len) for f, t in cases]
    held: dict[Fact, list[str]] = {}
    for (f, t), ex, ok in zip(cases, examples, greedy_hits(model, examples), strict=True):
        habit = shares.share(ex.ids[ex.n_prompt - 1], ex.ids[ex.n_prompt]) if shares is not None else 0.0
        if ok and len(ex.ids) - ex.n_prompt <= max_target_tokens and habit < max_habit:
            held.setdefault(f, []).append(t)
    return held


def make_fact_edits(model, tok, facts: list[Fact], n: int, n_neutral: int = 4, seed: int = 0,
                    max_target_tokens: int = 4, shares=None, max_habit: float = 1.0) -> list[EditRequest]:
    """`n` counterfactual edits of held facts, each with paraphrases (the fact's other templates) and
    neutral prompts (other held facts: half the edit's neighbours, half of other relations)."""
    rng = random.Random(seed)
    max_len = model.cfg.max_seq_len
    held = held_prompts(model, tok, facts, max_target_tokens, shares, max_habit)
    if len(held) < n + n_neutral + 2:
        raise FelixError(f"the model holds only {len(held)} of {len(facts)} facts; "
                         f"{too_few_facts(len(held), n, n_neutral)} (train on the facts source longer, or with a "
                         f"larger weight)")
    order = sorted(held, key=lambda f: (f.relation, f.subject))
    rng.shuffle(order)
    objects = {rel: sorted({f.object for f in facts if f.relation == rel}) for rel in TEMPLATES}
    edits = []  # (fact, template, prompt, target): the first n facts in `order` that have a counterfactual
    for f in order:
        if len(edits) == n:
            break
        template = rng.choice(held[f])
        others = [o for o in objects[f.relation] if o != f.object]
        for new in rng.sample(others, min(8, len(others))):
            prompt, target = Fact(f.relation, f.subject, new).prompt(template)
            ex = make_example(tok, prompt, target, max_len)
            if len(ex.ids) - ex.n_prompt <= max_target_tokens and not greedy_hits(model, [ex])[0]:
                edits.append((f, template, prompt, target))
                break
    edited = {e[0] for e in edits}
    pool = [f for f in order if f not in edited]
    if len(edits) < n or len(pool) < n_neutral:
        raise FelixError(f"found counterfactuals for {len(edits)} of the {len(held)} held facts, leaving "
                         f"{len(pool)} as neutral prompts; need {n} and {n_neutral}")
    requests = []
    for f, template, prompt, target in edits:
        paraphrases = [f.prompt(t)[0] for t in TEMPLATES[f.relation] if t != template]
        near = [g for g in pool if g.relation == f.relation]
        far = [g for g in pool if g.relation != f.relation]
        chosen = rng.sample(near, min(n_neutral // 2, len(near)))
        chosen += rng.sample(far, min(n_neutral - len(chosen), len(far)))
        neutral = [g.prompt(rng.choice(held[g]))[0] for g in chosen]
        requests.append(EditRequest(prompt, target, paraphrases, neutral, id=f"{f.relation}/{f.subject}"))
    distinct = len({p for r in requests for p in r.neutral})
    if distinct < n:  # EXP-46ao: 100 edits of a model holding 108 facts shared 8 neutral prompts
        log.warning("the %d edits share %d distinct neutral prompts (the model holds %d facts, %d of them "
                    "edited): locality measured over so few is noise; ask for fewer edits or train longer",
                    n, distinct, len(held), n)
    return requests


def preservation_path(edits: str | Path) -> Path:
    """Where `make-edits --source facts` writes an edit file's preservation prompts: beside it."""
    edits = Path(edits)
    return edits.with_name(edits.stem + ".preserve.jsonl")


def preservation_prompts(facts: list[Fact], requests: list[EditRequest]) -> list[str]:
    """Every template's prompt of each fact that no request names: not edited, and in no request's neutral
    prompts or paraphrases, so the neighbours a bench measures stay unseen (`--preserve-prompts`)."""
    named = {p for r in requests for p in (r.prompt, *r.paraphrases, *r.neutral)}
    out = []
    for f in facts:
        prompts = [f.prompt(t)[0] for t in TEMPLATES[f.relation]]
        if not named.intersection(prompts):
            out += prompts
    return out
