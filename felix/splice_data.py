"""Text the splice tools measure against, and the demo edit set built from facts the model holds.

- Held-out text: windows of the validation splits of every source of the checkpoint's data mix (never
  trained on), weighted as the mix weights its sources (`felix.heldout`); its perplexity is the drift
  the budget and the bench watch.
- Preservation windows: a fixed random sample of training windows, the "preserved knowledge" whose
  behaviour (KL) and SpliceCore keys (covariance) edits must keep.
- `make_edits`: facts the model actually holds, rewritten counterfactually (docs/splicing.md).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import torch

from felix import datamix
from felix.atomic import atomic_write_text
from felix.datamix import DataMix
from felix.errors import FelixError
from felix.heldout import HeldoutText
from felix.patch_format import STACK_FILE
from felix.shards import ShardSet, check_token_ids
from felix.splice_edit import METHOD_NAMES, EditRequest, jsonl_objects
from felix.splice_examples import Example, greedy_hits, make_example
from felix.tokenizer import EOT


def checkpoint_mix(ckpt) -> DataMix:
    """The data mix a checkpoint was trained on (`datamix.checkpoint_mix`), for the held-out text and the edit sets."""
    return datamix.checkpoint_mix(ckpt, "held-out text is needed for the budget")


def vocab_note(vocab_size: int, whose: str) -> str:
    """Whose vocabulary a shard's token ids are checked against (`check_token_ids`' `of`), and what an id
    past it means: the mix was re-sharded with another tokenizer since `whose` model was trained, or damaged."""
    return (f"{whose} (model.vocab_size {vocab_size}): shards written with a bigger tokenizer than its own, "
            f"or damaged (`felix data verify` checks their checksums)")


class _Windows:
    """The windows of `length` tokens that a source's shard files are cut into, back to back, in order,
    without listing them: a felix-300m mix has hundreds of millions, and listing them took 15 s and 1.8 GB for
    2B tokens to draw 256 (on every load of an edited artifact). Only the windows read are checked against the
    checkpoint's vocabulary."""

    def __init__(self, shards: ShardSet, split: str, length: int, ckpt):
        self.arrays, self.files, self.length = shards.arrays(split), shards.files(split), length
        self.vocab = ckpt.config.model.vocab_size
        self.of = vocab_note(self.vocab, f"checkpoint {ckpt.path}")
        self.counts = np.array([len(a) // length for a in self.arrays], dtype=np.int64)  # every whole window
        self.ends = np.cumsum(self.counts)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def rows(self, picks) -> list[np.ndarray]:
        """Windows `picks` (indices into all of them) as int64 rows."""
        out = []
        for i in picks:
            j = int(np.searchsorted(self.ends, i, side="right"))
            start = (int(i) - int(self.ends[j] - self.counts[j])) * self.length
            out.append(np.asarray(self.arrays[j][start : start + self.length], dtype=np.int64))
            check_token_ids(out[-1], self.vocab, self.files[j], start, self.of)
        return out


def corpus_windows(ckpt, split: str, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """(<=n, length) token windows from `split` of every mix source. val: all of them, in order. Otherwise up
    to n at random from each source, its shard files pooled (a source written as many files counts once),
    and n of those in random order."""
    rng = np.random.default_rng(seed)
    rows = []
    for shards in checkpoint_mix(ckpt).open_shards(verify=False).values():
        windows = _Windows(shards, split, length, ckpt)
        if split == "val":  # in order: only the first n of all sources' are kept
            rows += windows.rows(range(min(len(windows), max(0, n - len(rows)))))
        elif len(windows):
            picks = rng.choice(len(windows), size=min(len(windows), n), replace=False)
            rows += windows.rows(sorted(picks.tolist()))
    if split != "val":
        rng.shuffle(rows)
    if not rows:
        raise FelixError(f"the data mix of {ckpt.path} has no {split} windows of {length} tokens")
    return torch.from_numpy(np.stack(rows[:n]))


def heldout_text(ckpt, n: int, length: int) -> HeldoutText:
    """About `n` (<= n + sources) val windows of `length` tokens, every source's share of them as its mix
    weight's (at least one, at most all it has), spread evenly over its val split; each source weighs
    what the mix weighs it. A source whose val split is shorter than a window is left out (and the
    others' weights renormalized)."""
    if n <= 0:
        raise FelixError(f"held-out windows must be positive, got {n}")
    mix = checkpoint_mix(ckpt)
    shares = mix.targets()
    shards = mix.open_shards(verify=False)
    windows = {}
    for name, share in shares.items():
        spans = _Windows(shards[name], "val", length, ckpt)
        if not len(spans):
            continue
        picks = np.linspace(0, len(spans) - 1, min(len(spans), max(1, round(n * share)))).round().astype(int)
        windows[name] = torch.from_numpy(np.stack(spans.rows(picks)))
    if not windows:
        raise FelixError(f"the data mix of {ckpt.path} has no val windows of {length} tokens in any source")
    total = sum(shares[s] for s in windows)
    return HeldoutText(windows, {s: shares[s] / total for s in windows})


def corpus_documents(ckpt, tok, source: str | None = None, max_docs: int = 2000, seed: int = 0) -> list[str]:
    """Decoded training documents (split at <|endoftext|>) of one mix source (default: the first)."""
    shards = checkpoint_mix(ckpt).open_shards(verify=False)
    name = source or next(iter(shards))
    if name not in shards:
        raise FelixError(f"no source {name!r} in the data mix (have {sorted(shards)})")
    spans = []  # (array, start, end) of every document; only the ones kept get decoded
    vocab = ckpt.config.model.vocab_size
    for path, a in zip(shards[name].files("train"), shards[name].arrays("train"), strict=True):
        check_token_ids(a, vocab, path, 0, vocab_note(vocab, f"checkpoint {ckpt.path}"))  # on the memmap: no copy
        ends = np.flatnonzero(np.asarray(a) == tok.eot_id)
        starts = np.concatenate([[0], ends[:-1] + 1])
        spans += [(a, s, e) for s, e in zip(starts, ends, strict=True)]
    random.Random(seed).shuffle(spans)
    return [tok.decode(np.asarray(a[s:e]).tolist()) for a, s, e in spans[:max_docs]]


class NextTokenShares:
    """How often each token follows each context of the last `context` tokens in a sample of the training
    text (bigram counts for context 1)."""

    def __init__(self, arrays, vocab_size: int, max_tokens: int = 20_000_000, context: int = 1,
                 files: list[Path] | None = None, of: str = "the model"):
        """`files`: the shard files `arrays` map, named (with `of`, whose vocabulary it is) when one holds an
        id past `vocab_size`, which would key other contexts' counts."""
        if context < 1 or vocab_size ** (context + 1) >= 2**63:
            raise FelixError(f"context {context} with vocabulary {vocab_size}: keys do not fit in 64 bits")
        self.vocab, self.context = vocab_size, context
        contexts, pairs = [], []
        left = max_tokens
        for i, a in enumerate(arrays):
            a = np.asarray(a[: max(left, 0)], dtype=np.int64)
            check_token_ids(a, vocab_size, files[i] if files else f"token array {i}", 0, of)
            left -= len(a)
            if len(a) > context:
                c = self._key(a, context)
                contexts.append(c)
                pairs.append(c * vocab_size + a[context:])
        empty = np.zeros(0, np.int64)
        self.context_keys, self.context_counts = np.unique(np.concatenate(contexts or [empty]), return_counts=True)
        self.pair_keys, self.pair_counts = np.unique(np.concatenate(pairs or [empty]), return_counts=True)

    def _key(self, a: np.ndarray, k: int) -> np.ndarray:
        """The key of every window of k tokens of `a` that a next token follows."""
        c = np.zeros(len(a) - k, np.int64)
        for j in range(k):
            c = c * self.vocab + a[j : len(a) - k + j]
        return c

    @staticmethod
    def _count(keys: np.ndarray, counts: np.ndarray, key: int) -> int:
        i = int(np.searchsorted(keys, key))
        return int(counts[i]) if i < len(keys) and int(keys[i]) == key else 0

    @classmethod
    def of_checkpoint(cls, ckpt, vocab_size: int, context: int = 1) -> NextTokenShares:
        shards = checkpoint_mix(ckpt).open_shards(verify=False).values()
        return cls([a for s in shards for a in s.arrays("train")], vocab_size, context=context,
                   files=[f for s in shards for f in s.files("train")],
                   of=vocab_note(vocab_size, f"checkpoint {ckpt.path}"))

    def _context_key(self, prev) -> int | None:
        """`prev` is a token (context 1) or tokens ending in the context; None when too short."""
        prev = [prev] if isinstance(prev, int) else list(prev)[-self.context:]
        return int(self._key(np.array([*prev, 0]), self.context)[0]) if len(prev) == self.context else None

    def context_count(self, prev) -> int:
        """Occurrences of the context `prev` ends in."""
        key = self._context_key(prev)
        return 0 if key is None else self._count(self.context_keys, self.context_counts, key)

    def share(self, prev, nxt: int) -> float:
        """count(context, nxt) / count(context): 0 for a context never seen."""
        key = self._context_key(prev)
        total = 0 if key is None else self._count(self.context_keys, self.context_counts, key)
        return self._count(self.pair_keys, self.pair_counts, key * self.vocab + nxt) / total if total else 0.0


WORD = re.compile(r"(?<=[ .(=\[])[A-Za-z_][A-Za-z0-9_]{2,}")


def _candidates(docs: list[str], context_lines: int, rng: random.Random, lines_per_doc: int):
    """(context lines, line prefix, target word) triples; the target keeps its leading space."""
    for doc in docs:
        lines = doc.splitlines()
        for i in rng.sample(range(context_lines, len(lines)), min(lines_per_doc, max(0, len(lines) - context_lines))):
            line = lines[i]
            words = [m for m in WORD.finditer(line) if m.start() > 3]
            if not words:
                continue
            m = rng.choice(words)
            start = m.start() - 1 if line[m.start() - 1] == " " else m.start()
            ctx = lines[i - context_lines : i]  # verbatim, so the prompt is text the model was trained on
            yield ctx, line[:start], line[start : m.end()]


def too_few_facts(found: int, n: int, n_neutral: int) -> str:
    """What `--n n` needs beyond the `found` held facts, and the largest --n they allow: the request alone
    ("need 506" for --n 500) left a user to guess the neutral prompts' share."""
    extra = n_neutral + 2  # neutral prompts, and room to draw them from
    most = f": --n {found - extra} at most" if found > extra else ""
    return f"--n {n} needs {n + extra} ({extra} more for neutral prompts){most}"


def make_edits(model, tok, docs: list[str], n: int, n_neutral: int = 4, context_lines: int = 3,
               seed: int = 0, max_target_tokens: int = 3, shares: NextTokenShares | None = None,
               max_habit: float = 1.0, lines_per_doc: int = 48) -> list[EditRequest]:
    """`n` counterfactual edits of facts the model holds, each with paraphrases and neutral prompts.

    A fact: a code line prefix (with the lines before it) whose next identifier the model completes
    correctly under greedy decoding and that is knowledge of the context, not a habit of the last token:
    with `shares`, the target's first token must follow the prompt's last token in under `max_habit` of
    that token's occurrences in the training text (`def f(` → `self` is syntax, not a fact; rewriting it
    rewrites every `def g(` too). The edit keeps the prompt and swaps the target for the identifier
    of another held fact with the same leading-space form that the model does not already produce there.
    Paraphrases keep the line prefix (the "subject") and change its context: (1) without the preceding
    lines, (2) behind another fact's preceding lines. Neutral prompts are other held facts, disjoint
    from every edited prompt, so their greedy output should not change.
    """
    rng = random.Random(seed)
    max_len = model.cfg.max_seq_len
    facts, seen = [], set()
    want = 3 * n + 2 * n_neutral + 16
    batch: list[tuple[str, str, list[str]]] = []

    def flush() -> None:
        exs = [make_example(tok, p, t, max_len) for p, t, _ in batch]
        for (p, t, c), ok, ex in zip(batch, greedy_hits(model, exs), exs, strict=True):
            habit = shares.share(ex.ids[ex.n_prompt - 1], ex.ids[ex.n_prompt]) if shares is not None else 0.0
            if ok and len(ex.target) <= max_target_tokens and habit < max_habit:
                facts.append({"prompt": p, "target": t, "context": c, "line": p.split("\n")[-1]})
        batch.clear()

    for ctx, prefix, target in _candidates(docs, context_lines, rng, lines_per_doc):
        # one fact per line prefix, indentation aside: a neutral prompt ending in an edited prompt's line
        # would be that edit's paraphrase (EXP-46g had `with self.` as both)
        if len(prefix.strip()) < 4 or prefix.strip() in seen:
            continue
        seen.add(prefix.strip())
        batch.append(("\n".join([*ctx, prefix]), target, ctx))
        if len(batch) == 64:
            flush()
            if len(facts) >= want:
                break
    if batch:
        flush()
    if len(facts) < n + n_neutral + 2:
        raise FelixError(f"found only {len(facts)} facts the model holds; {too_few_facts(len(facts), n, n_neutral)} "
                         f"(train the model longer or give more documents)")
    rng.shuffle(facts)
    edited, pool = facts[:n], facts[n:]
    requests = []
    for i, f in enumerate(edited):
        same_form = [g["target"] for g in facts
                     if g["target"] != f["target"] and g["target"][:1].isspace() == f["target"][:1].isspace()]
        other = rng.choice([g for g in facts if g is not f])
        paraphrases = [f["line"], "\n".join([*other["context"], f["line"]])]
        paraphrases = [p for p in paraphrases if p != f["prompt"] and len(p.strip()) >= 4]
        neutral = [g["prompt"] for g in rng.sample(pool, min(n_neutral, len(pool)))]
        for new in rng.sample(same_form, min(8, len(same_form))):
            if not greedy_hits(model, [make_example(tok, f["prompt"], new, max_len)])[0]:
                requests.append(EditRequest(f["prompt"], new, paraphrases, neutral, id=f"e{i:03d}"))
                break
    if len(requests) < n:  # else `make-edits --n N` wrote fewer (even no) edits and reported success
        raise FelixError(f"found a counterfactual target for only {len(requests)} of the {n} held facts to edit "
                         f"(another held fact's identifier, of the same leading-space form, that the model does "
                         f"not already produce there); give more documents or try another seed")
    return requests


CONTEXT_LINES = 3  # lines of other text in front of a context variant's prompt line


def context_variants(tok, req: EditRequest, preserve: torch.Tensor, n: int, max_len: int) -> list[Example]:
    """The request's prompt line behind `n` other contexts, each with its target: CONTEXT_LINES whole
    lines from a preservation window, then the prompt's last line. ROME averages its key over random
    prefixes so an edit generalizes; `closed_form_a` writes the edit at each variant's keys. The windows are
    drawn with a seed from the prompt, so a request gets the same variants wherever it is applied."""
    if n <= 0:
        return []
    body = req.prompt.rstrip("\n")
    line = body.rpartition("\n")[2] + req.prompt[len(body):]
    rng = random.Random(int.from_bytes(hashlib.blake2b(req.prompt.encode(), digest_size=8).digest(), "little"))
    out = []
    for i in rng.sample(range(len(preserve)), min(n, len(preserve))):
        text = tok.decode(preserve[i].tolist()).split(EOT)  # the longest document piece, its whole lines
        lines = max(text, key=len).split("\n")[1:-1]
        start = rng.randrange(max(1, len(lines) - CONTEXT_LINES + 1))
        context = "\n".join(lines[start : start + CONTEXT_LINES])
        out.append(make_example(tok, f"{context}\n{line}", req.target, max_len))
    return out


def examples_of(tok, req: EditRequest, max_len: int) -> tuple[Example, list[Example]]:
    """The edit example and its paraphrase examples (same target)."""
    try:
        return (make_example(tok, req.prompt, req.target, max_len),
                [make_example(tok, p, req.target, max_len) for p in req.paraphrases])
    except FelixError as exc:
        raise FelixError(f"{req.name}: {exc}") from None


PRESERVE_WINDOWS = 256  # the measured default (docs/splicing.md; EXP-46d, EXP-46l)
HELDOUT_WINDOWS = 128  # 16K tokens over the mix's sources (EXP-46n)


def preservation_windows(ckpt, model, n: int = PRESERVE_WINDOWS) -> torch.Tensor:
    """The preservation windows (train split: the edits' KL and covariances, GPTQ's calibration text)."""
    # 256 windows (32K tokens) for closed_form_a's d_ff x d_ff input covariance: with 64 (8K tokens) the 12
    # tuning edits drifted +0.69% and kept 68% of neutral continuations, with 256 +0.11% and 74%
    # (docs/splicing.md)
    return corpus_windows(ckpt, "train", n, _window_length(model), seed=1)


def _window_length(model) -> int:
    return min(128, model.cfg.max_seq_len)


def splice_texts(ckpt, model, preserve_windows: int = PRESERVE_WINDOWS,
                 heldout_windows: int = HELDOUT_WINDOWS) -> tuple[HeldoutText, torch.Tensor]:
    """Held-out text (val splits: the perplexity budget) and preservation windows (train: KL, keys)."""
    return (heldout_text(ckpt, heldout_windows, _window_length(model)),
            preservation_windows(ckpt, model, preserve_windows))


def load_prompts(path: str | Path) -> list[str]:
    """Preservation prompts: JSONL, one `{"prompt": "..."}` per line (docs/splicing.md)."""
    prompts = []
    for where, obj in jsonl_objects(path, "preservation prompts"):
        if set(obj) != {"prompt"} or not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise FelixError(f"{where}: expected an object with one key, 'prompt', a non-empty string")
        prompts.append(obj["prompt"])
    return prompts


def save_prompts(path: str | Path, prompts: list[str]) -> None:
    atomic_write_text(path, "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts))


def stack_requests(stack) -> list[EditRequest]:
    """The requests of a patch stack's fact edits, bottom first. Patches that are not fact edits (a
    server's tensor pushes and gate biases, a re-quantization) have none; a damaged one names stack.json."""
    return [EditRequest.from_dict(p.record.get("request"), f"{stack.dir / STACK_FILE}: patch {p.id}'s request")
            for p in stack.list() if p.record.get("method") in METHOD_NAMES]


def stack_edit_ids(stack) -> list[str]:
    """The patch ids of a patch stack's fact edits, bottom first (`stack_edits`' order)."""
    return [p.id for p in stack.list() if p.record.get("method") in METHOD_NAMES]


def stack_edits(stack, tok, max_len: int) -> list[Example]:
    """The edit examples of a patch stack's fact edits, bottom first."""
    return [examples_of(tok, r, max_len)[0] for r in stack_requests(stack)]


def stack_neutral(stack) -> list[str]:
    """The neutral prompts of a patch stack's fact edits, bottom first, each once."""
    return list(dict.fromkeys(n for r in stack_requests(stack) for n in r.neutral))
