"""The facts source (felix.facts), the demo mix that includes it, and the edit set built from it."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from felix.config import ModelConfig
from felix.errors import FelixError
from felix.facts import TEMPLATES, Fact, fact_documents, stdlib_facts
from felix.splice_examples import greedy_hits, make_example
from felix.splice_facts import held_prompts, make_fact_edits


def test_facts_are_the_standard_librarys_tables():
    facts = stdlib_facts()
    by_rel = Counter(f.relation for f in facts)
    assert set(by_rel) == set(TEMPLATES) and min(by_rel.values()) >= 30
    assert Fact("http_status", "404", "Not Found") in facts
    assert Fact("exception_base", "ZeroDivisionError", "ArithmeticError") in facts
    assert Fact("html_entity", "eacute", "é") in facts
    assert not [f for f in facts if f.subject == "IOError"]  # an alias of OSError, not a class of its own
    # one object per subject and relation, or "the" object of an edit would be ambiguous
    assert len({(f.relation, f.subject) for f in facts}) == len(facts)


def test_every_template_states_the_object_after_a_space_and_prompts_cut_there():
    for rel, templates in TEMPLATES.items():
        assert len(templates) >= 3, rel
        for t in templates:
            assert t.count("{s}") == 1 and t.count("{o}") == 1 and " {o}" in t, t
    f = Fact("http_status", "404", "Not Found")
    for t in TEMPLATES["http_status"]:
        prompt, target = f.prompt(t)
        assert target == " Not Found" and f.statement(t).startswith(prompt + target)
        assert not prompt.endswith(" ")


def test_fact_documents_state_every_fact_in_every_template_once():
    facts = stdlib_facts()[:50]
    docs = fact_documents(facts, seed=3, per_doc=7)
    lines = [line for d in docs for line in d.split("\n")]
    assert Counter(lines) == Counter(f.statement(t) for f in facts for t in TEMPLATES[f.relation])
    assert all(len(d.split("\n")) <= 7 for d in docs)
    assert fact_documents(facts, seed=3, per_doc=7) == docs != fact_documents(facts, seed=4, per_doc=7)


def test_corpus_with_facts_adds_the_source_outside_the_cap(tmp_path):
    from felix import corpus

    plain = corpus.build_stdlib_corpus(tmp_path / "a", max_bytes=30_000, seed=1)
    assert "facts" not in plain
    with_facts = corpus.build_stdlib_corpus(tmp_path / "b", max_bytes=30_000, seed=1, facts=True)
    texts = [json.loads(line)["text"] for line in with_facts["facts"].read_text().splitlines()]
    assert texts == fact_documents(stdlib_facts(), seed=1)
    assert with_facts["code"].read_bytes() == plain["code"].read_bytes()  # the other sources keep their budget
    # asking for the facts rebuilds a corpus made without them
    from felix.cli import main

    assert main(["data", "corpus", "--out", str(tmp_path / "a"), "--max-bytes", "30000", "--seed", "1",
                 "--facts"]) == 0
    again = corpus.build_stdlib_corpus(tmp_path / "a", max_bytes=30_000, seed=1, facts=True)
    assert again["facts"].is_file()
    assert json.loads((tmp_path / "a" / "corpus.json").read_text())["params"]["facts"] is True


def test_demo_weights_and_a_demo_directory_mixed_otherwise(tmp_path):
    from felix.demo import DEMO_WEIGHTS, demo_weights, prepare_data

    assert demo_weights(0.0) == DEMO_WEIGHTS
    w = demo_weights(0.2)
    assert w["facts"] == 0.2 and sum(w.values()) == pytest.approx(1)
    assert w["code"] / w["docs"] == pytest.approx(DEMO_WEIGHTS["code"] / DEMO_WEIGHTS["docs"])
    with pytest.raises(FelixError, match="facts weight"):
        demo_weights(1.0)
    _, mix_path = prepare_data(tmp_path, 300, 30_000, 0, {}, facts_weight=0.2)
    from felix.datamix import DataMix

    assert DataMix.load(mix_path).targets()["facts"] == pytest.approx(0.2)
    assert "weight: 0.44\n" in mix_path.read_text()  # 0.55 * 0.8, as a person writes it (not 0.44000000000000006)
    # a mix.yaml written before weights were rounded is the same mix
    mix_path.write_text(mix_path.read_text().replace("weight: 0.44\n", "weight: 0.44000000000000006\n"))
    prepare_data(tmp_path, 300, 30_000, 0, {}, facts_weight=0.2)
    # the same directory asked for another mix: refused, naming the file, rather than silently reused
    with pytest.raises(FelixError, match="mix.yaml"):
        prepare_data(tmp_path, 300, 30_000, 0, {}, facts_weight=0.1)


class FactOracle(torch.nn.Module):
    """A "model" that holds exactly the facts it is given, each after the templates it is given: it knows
    the next token after every prefix of those prompts' completions, and predicts token 0 elsewhere."""

    def __init__(self, tok, held: dict[Fact, list[str]], cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = torch.nn.Embedding(1, 1)
        self.table: dict[tuple[int, ...], int] = {}
        for f, templates in held.items():
            for t in templates:
                ex = make_example(tok, *f.prompt(t), 4096)
                for i in range(ex.n_prompt, len(ex.ids)):
                    self.table[ex.ids[:i]] = ex.ids[i]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*idx.shape, self.cfg.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                out[b, t, self.table.get(tuple(row[: t + 1]), 0)] = 1.0
        return out


@pytest.fixture(scope="module")
def oracle_world(tmp_path_factory):
    """Three relations' facts, the ones the oracle holds (by template), a tokenizer trained on them, the oracle."""
    from felix.tokenizer import FelixTokenizer, train_tokenizer

    facts = [f for f in stdlib_facts() if f.relation in ("http_status", "exception_base", "signal_number")]
    rng = random.Random(0)
    # the oracle holds 2 of 3 facts, each after a random non-empty subset of its templates
    held = {f: rng.sample(TEMPLATES[f.relation], rng.randint(1, 3)) for f in facts if rng.random() < 2 / 3}
    tmp = tmp_path_factory.mktemp("facts_oracle")
    (tmp / "facts.txt").write_text("\n".join(fact_documents(facts)), encoding="utf-8")
    train_tokenizer([tmp / "facts.txt"], 512, tmp / "tok.json")
    tok = FelixTokenizer.load(tmp / "tok.json")
    return facts, held, tok, FactOracle(tok, held, ModelConfig(vocab_size=512, max_seq_len=256))


def test_make_fact_edits_rewrites_held_facts(oracle_world):
    facts, held, tok, oracle = oracle_world
    found = held_prompts(oracle, tok, facts, max_target_tokens=64)
    assert found == {f: [t for t in TEMPLATES[f.relation] if t in ts] for f, ts in held.items()}

    reqs = make_fact_edits(oracle, tok, facts, 20, seed=1, max_target_tokens=64)
    assert len(reqs) == 20 and len({r.id for r in reqs}) == 20
    by_id = {f"{f.relation}/{f.subject}": f for f in facts}
    edited = {by_id[r.id] for r in reqs}
    for r in reqs:
        f = by_id[r.id]
        template = next(t for t in held[f] if f.prompt(t)[0] == r.prompt)  # a template the model holds it by
        assert r.target != " " + f.object and r.target[1:] in {g.object for g in facts if g.relation == f.relation}
        assert greedy_hits(oracle, [make_example(tok, r.prompt, r.target, 256)]) == [False]
        assert r.paraphrases == [f.prompt(t)[0] for t in TEMPLATES[f.relation] if t != template]
        # neutral: held facts nobody edits, two of them the edit's neighbours (same relation)
        neutral = [next(g for g in held if g not in edited and any(g.prompt(t)[0] == n for t in held[g]))
                   for n in r.neutral]
        assert len(neutral) == 4 and sum(g.relation == f.relation for g in neutral) == 2
    # a short target limit leaves out the facts whose object is longer
    short = held_prompts(oracle, tok, facts, max_target_tokens=1)
    assert short and all(len(tok.encode(" " + f.object)) == 1 for f in short)
    with pytest.raises(FelixError, match="holds only"):
        make_fact_edits(oracle, tok, facts, len(held), max_target_tokens=64)


def test_make_fact_edits_warns_when_its_neutral_pool_is_small(oracle_world, caplog):
    facts, held, tok, oracle = oracle_world
    for n in (20, len(held) - 6):  # plenty of facts left for neutral prompts; six left
        caplog.clear()
        reqs = make_fact_edits(oracle, tok, facts, n, seed=1, max_target_tokens=64)
        distinct = len({p for r in reqs for p in r.neutral})
        assert (distinct < n) is (n > 20) and ("distinct neutral prompts" in caplog.text) is (distinct < n)
