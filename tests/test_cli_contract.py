"""The CLI's machine-readable contract, over every verb the real parser has: each has --help; each that takes
--json prints exactly one JSON object on stdout, as its one line, with no NaN/Infinity (strict JSON); what a
person reads (reports, progress, warnings) goes to stderr or is left out.

The verbs come from felix.cli.build_parser (sub-parsers walked recursively, and the positional actions of
`harvest`/`synth`), so a verb added with --json but without an entry in INVOCATIONS fails this module."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from provider_servers import ProviderServer
from splice_helpers import counterfactual
from test_trainer import write_config

from felix.cli import build_parser, main
from felix.config import load_config
from felix.datamix import DataMix, MixSource
from felix.shards import write_shards
from felix.splice_edit import EditRequest, save_requests
from felix.tasks.suite import load_set
from felix.tokenizer import FelixTokenizer
from felix.trainer import Trainer

Verb = tuple[str, ...]


def _children(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser | None]:
    """Sub-verbs: a sub-parser's choices, or a positional action's choices (`felix harvest diff`), as None."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    for action in parser._actions:
        if not action.option_strings and action.dest == "action" and action.choices:
            return dict.fromkeys(action.choices)
    return {}


def _walk(parser: argparse.ArgumentParser, path: Verb) -> Iterator[tuple[Verb, bool]]:
    """(path, takes --json) of `parser` and every sub-verb below it; a verb with sub-verbs runs none itself
    (`felix harvest` is `felix harvest run`, listed as such)."""
    children = _children(parser)
    takes_json = "--json" in parser._option_string_actions
    yield path, takes_json and not children
    for name, child in children.items():
        if child is None:  # an action of this parser, taking its options
            yield (*path, name), takes_json
        else:
            yield from _walk(child, (*path, name))


def enumerate_verbs() -> dict[Verb, bool]:
    """Every verb path, groups included (each verb's parser is built whole only when it is the verb run)."""
    return {path: takes_json for verb in _children(build_parser())
            for path, takes_json in _walk(_children(build_parser(verb))[verb], (verb,))}


VERBS = enumerate_verbs()


@dataclass
class Ctx:
    """What the invocations need: a scratch directory, the tiny data mix, a config, a trained checkpoint."""

    tmp: Path
    mix: Path
    tokenizer: Path
    source: Path
    config: Path
    ckpt: Path
    prompt: str
    target: str
    edits: Path
    outputs: Path
    harvest: Path
    synth: Path


def _splice(ctx: Ctx, verb: str, *args: str) -> list[str]:
    return ["splice", verb, "--checkpoint", str(ctx.ckpt), *args]


def _harvest(ctx: Ctx, action: str, *args: str) -> list[str]:
    return ["harvest", action, "--config", str(ctx.harvest), *args]


def _synth(ctx: Ctx, action: str, *args: str) -> list[str]:
    return ["synth", action, "--config", str(ctx.synth), *args]


WORDS = ["name", "value", "data", "path", "size", "args", "line", "text", "result", "items", "key", "self"]


def _fact_run(ctx: Ctx) -> Path:
    """A run that has learnt one short code document by heart: facts for make-edits to find (the tiny splice
    model holds none)."""
    root = ctx.tmp / "facts"
    doc = "\n".join(f"    {a} = {b}.{c}"
                    for a, b, c in zip(WORDS, WORDS[3:] + WORDS[:3], WORDS[6:] + WORDS[:6], strict=True))
    tok = FelixTokenizer.load(ctx.tokenizer)
    # copies of one text share a split (a hash of the text decides): the top-up holds six of them out
    write_shards([doc] * 60, tok, root / "shards", val_fraction=0.0, min_val_tokens=6 * (len(tok.encode(doc)) + 1))
    DataMix(sources=[MixSource(name="code", shards=Path("shards"), weight=1.0)]).write(root / "mix.yaml")
    raw = {"model": {"vocab_size": 512, "n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 128, "max_seq_len": 128,
                     "splice_every": 2, "splice_rank": 4},
           "train": {"seq_len": 64, "micro_batch_size": 4, "max_steps": 80, "lr": 2e-2, "warmup_steps": 2,
                     "eval_every": 0, "ckpt_every": 80, "dtype": "fp32", "threads": 1, "peak_flops": 1e11},
           "data": {"tokenizer": str(ctx.tokenizer), "mix": str(root / "mix.yaml")}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    Trainer(load_config(root / "cfg.yaml"), root / "run", progress=False).run()
    return root / "run"


EDIT = ["--layers", "3", "--method", "kl_train", "--steps", "20", "--lr", "0.03", "--max-ppl-increase", "1",
        "--max-neutral-kl", "10", "--preserve-windows", "4", "--heldout-windows", "4"]

# A cheap real invocation of every --json verb (several where one needs another first); --json is added.
INVOCATIONS: dict[Verb, Callable[[Ctx], list[list[str]]]] = {
    ("demo",): lambda c: [["demo", "--out", str(c.tmp / "demo"), "--corpus-mb", "0.1", "--max-steps", "2",
                           "model.vocab_size=300", "model.d_model=32", "model.n_heads=2",
                           "model.d_ff=64", "model.n_layers=2", "train.seq_len=32", "train.micro_batch_size=2",
                           "train.eval_every=2", "train.ckpt_every=2", "train.warmup_steps=1",
                           "train.dtype=fp32"]],
    ("data", "corpus"): lambda c: [["data", "corpus", "--out", str(c.tmp / "corpus"), "--max-bytes", "20000"]],
    ("data", "shard"): lambda c: [["data", "shard", "--input", str(c.source), "--tokenizer", str(c.tokenizer),
                                   "--out", str(c.tmp / "shards"), "--val-fraction", "0.1"]],
    ("data", "verify"): lambda c: [["data", "verify", "--mix", str(c.mix)]],
    ("data", "audit"): lambda c: [["data", "audit", "--mix", str(c.mix), "--tokens", "2000", "--seq-len", "32"]],
    ("tokenizer", "train"): lambda c: [["tokenizer", "train", "--input", str(c.source), "--vocab-size", "300",
                                        "--out", str(c.tmp / "tok.json")],
                                       ["tokenizer", "train", "--input", str(c.source), "--vocab-size", "300",
                                        "--sample-bytes", "2k", "--out", str(c.tmp / "tok-sample.json")]],
    ("tokenizer", "encode"): lambda c: [["tokenizer", "encode", "--tokenizer", str(c.tokenizer), "--text", "hi"]],
    ("train",): lambda c: [["train", "--config", str(c.config), "--out", str(c.tmp / "run")]],
    ("generate",): lambda c: [["generate", "--checkpoint", str(c.ckpt), "--prompt", "def ",
                               "--max-new-tokens", "4"]],
    ("quantize",): lambda c: [["quantize", "--checkpoint", str(c.ckpt), "--format", "q8_0"]],
    ("quant", "survival"): lambda c: [["quant", "survival", "--checkpoint", str(c.ckpt), "--format", "q8_0",
                                       "--tokens", ".", "--json-prompts", "0", "--probe-limit", "8",
                                       "--val-windows", "1"]],
    ("export", "gguf"): lambda c: [["export", "gguf", "--checkpoint", str(c.ckpt), "--out",
                                    str(c.tmp / "m.gguf"), "--dtype", "q8_0"]],
    ("export", "hf"): lambda c: [["export", "hf", "--checkpoint", str(c.ckpt), "--out", str(c.tmp / "hf")]],
    ("splice", "diagnose"): lambda c: [_splice(c, "diagnose", "--prompt", c.prompt, "--target", c.target)],
    # rolled back again: every other invocation sees the checkpoint as trained, whatever runs first
    ("splice", "apply"): lambda c: [_splice(c, "apply", "--prompt", c.prompt, "--target", c.target, *EDIT),
                                    _splice(c, "rollback")],
    ("splice", "list"): lambda c: [_splice(c, "list")],
    ("splice", "rollback"): lambda c: INVOCATIONS["splice", "apply"](c),
    ("splice", "bench"): lambda c: [_splice(c, "bench", "--edits", str(c.edits), "--n", "1", *EDIT)],
    ("splice", "make-edits"): lambda c: [["splice", "make-edits", "--checkpoint", str(_fact_run(c)), "--out",
                                          str(c.tmp / "e.jsonl"), "--n", "1", "--max-habit", "1"]],
    ("validate",): lambda c: [["validate", str(c.outputs)]],
    ("harvest", "run"): lambda c: [_harvest(c, "run", "--limit", "1")],
    # the other actions read the store a run fills (a second run asks nothing again)
    ("harvest", "status"): lambda c: [_harvest(c, "run", "--limit", "1"), _harvest(c, "status")],
    ("harvest", "export"): lambda c: [_harvest(c, "run", "--limit", "1"),
                                      _harvest(c, "export", "--out", str(c.tmp / "harvested"))],
    ("harvest", "diff"): lambda c: [_harvest(c, "run", "--limit", "1"), _harvest(c, "diff")],
    ("synth", "run"): lambda c: [_synth(c, "run")],
    ("synth", "status"): lambda c: [_synth(c, "run"), _synth(c, "status")],
    ("synth", "mix"): lambda c: [_synth(c, "run"), _synth(c, "mix", "--out", str(c.tmp / "fp.jsonl"))],
    ("info",): lambda c: [["info", "--config", str(c.config)]],
    ("plan",): lambda c: [["plan", "--config", str(c.config), "--tok-per-s", "1000"]],
    ("bench", "train"): lambda c: [["bench", "train", "--config", str(c.config), "--steps", "1", "--warmup", "0"]],
    ("bench", "memory"): lambda c: [["bench", "memory", "--config", str(c.config)]],
}
SLOW = {("bench", "memory"), ("splice", "make-edits")}  # a fresh process; a model trained to hold facts


def test_every_json_verb_has_an_invocation():
    assert set(INVOCATIONS) == {path for path, has_json in VERBS.items() if has_json}


@pytest.mark.parametrize("path", sorted(VERBS), ids=" ".join)
def test_help_exits_zero(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    assert "usage: felix" in capsys.readouterr().out


DOC = ("The build farm has 12 runners. In March the queue time rose from 4 minutes to 19 minutes after the cache "
       "moved to a slower disk. Priya Raman moved the cache back on 14 March and queue time fell to 5 minutes.")


def _rephrase(req) -> str:
    """Answers in each FinePhrase format (imported here: test_synth needs the openai SDK, which sent this)."""
    from test_synth import rephrase

    return rephrase(req)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny, tiny_mix) -> Iterator[Ctx]:
    model, tok, ckpt, *_ = tiny
    tmp = tmp_path_factory.mktemp("contract")
    ex = counterfactual(model, tok)
    prompt, target = tok.decode(ex.ids[: ex.n_prompt]), tok.decode(ex.target)
    save_requests(tmp / "edits.jsonl", [EditRequest(prompt, target, [], ["import "])])
    outputs = tmp / "outputs.jsonl"
    outputs.write_text("".join(json.dumps({"id": it["id"], "output": json.dumps(it["reference"])}) + "\n"
                               for it in load_set("dev")[:2]), encoding="utf-8")
    (tmp / "docs.jsonl").write_text(json.dumps({"text": DOC}) + "\n", encoding="utf-8")
    with ProviderServer("openai", responder=_rephrase) as srv:
        teachers = [{"name": "t", "provider": "openai", "model": "m", "base_url": srv.url + "/v1", "timeout": 2}]
        base = {"teachers": teachers, "retry": {"max_retries": 0, "max_attempts": 1, "backoff_base": 0.0}}
        harvest, synth = tmp / "harvest.yaml", tmp / "synth.yaml"
        harvest.write_text(yaml.safe_dump(base | {"store": "h.sqlite", "items": [{"set": "dev"}]}))
        synth.write_text(yaml.safe_dump(base | {"store": "s.sqlite", "synth": {"sources": ["docs.jsonl"],
                                                                               "min_chars": 20}}))
        config = write_config(tmp, tiny_mix, max_steps=2, warmup_steps=1, eval_every=0, ckpt_every=2)
        yield Ctx(tmp, tiny_mix.mix_path, tiny_mix.tokenizer_path, tiny_mix.root / "prose.jsonl", config, ckpt.path,
                  prompt, target, tmp / "edits.jsonl", outputs, harvest, synth)


def _strict(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW else p
                                  for p in sorted(INVOCATIONS)], ids=" ".join)
def test_json_is_one_strict_object_and_nothing_else_on_stdout(path, ctx, capfd):
    if path[0] in ("harvest", "synth"):
        pytest.importorskip("openai")  # the teachers' SDK (the `teachers` extra) asks the local server
    for argv in INVOCATIONS[path](ctx):
        capfd.readouterr()
        rc = main([*argv, "--json"])
        out, err = capfd.readouterr()
        assert rc == 0, f"felix {' '.join(argv)} --json: exit {rc}\n{err[-2000:]}"
        lines = out.splitlines()
        assert lines, f"felix {' '.join(argv)} --json printed nothing on stdout"
        try:
            last = _strict(lines[-1])
        except ValueError as exc:
            pytest.fail(f"felix {' '.join(argv)} --json: the last stdout line is not strict JSON ({exc}): "
                        f"{lines[-1][:200]!r}")
        assert isinstance(last, dict), lines[-1][:200]
        # and nothing else: the human report is for runs without --json
        assert len(lines) == 1, f"felix {' '.join(argv)} --json: more on stdout than the object: {lines[:-1]}"
