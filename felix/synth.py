"""FinePhrase synthesis: rephrase source documents into the formats that help pretraining.

The four formats that beat plain text in the FinePhrase study (table, math, faq, tutorial) each get a
prompt of our own. Requests go through the same store and runner as the harvest (idempotent,
resumable, accounted); each answer is checked for the shape its format promises before it is kept.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from felix.corpus import iter_documents
from felix.errors import FelixError
from felix.harvest import teacher_secrets
from felix.harvest_config import HarvestConfig, TeacherConfig
from felix.harvest_runner import Harvester, Judgement
from felix.harvest_store import HarvestStore, Job, request_key
from felix.synth_heldout import Heldout, load_heldout, text_key
from felix.tasks import match
from felix.teachers import Completion

FORMATS = ("table", "math", "faq", "tutorial")
PROMPT_VERSION = {f: f"finephrase-{f}-v1" for f in FORMATS}

_SYSTEM = ("You rewrite documents into study material for training a language model. Work only from the "
           "document: keep its facts, names and numbers exactly, add nothing it does not support, and write the "
           "result in the document's language. Reply with the rewritten text only, no preamble.")
_TASK = {
    "table": "Pull the key facts of the document into a Markdown table (a header row, a separator row, then one "
             "row per fact). Under the table, write one question that the table answers, then its answer, "
             "as lines starting with 'Question:' and 'Answer:'.",
    "math": "Write a word problem with several steps that uses numbers or quantities from the document, then "
            "solve it step by step, showing each calculation, and end with a line 'Answer: <result>'. If the "
            "document has no numbers, build the problem from counts of things it names.",
    "faq": "Write a list of questions a reader would ask about the document, each followed by its answer. "
           "Order them from the most basic to the most advanced. Start each question with 'Q:' and each "
           "answer with 'A:'.",
    "tutorial": "Turn the document into a tutorial: one line saying what the reader will learn, then numbered "
                "steps ('1.', '2.', ...), each one short and concrete, in the order a learner would do them.",
}

_TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$", re.MULTILINE)
_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$", re.MULTILINE)
_STEP = re.compile(r"^\s*(\d+)[.)]\s+\S", re.MULTILINE)
_WORDS = re.compile(r"\w+")
# where a cut ends a sentence (its mark and any closing quotes or brackets, before a space), or a word
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)")
_WORD_END = re.compile(r"\S(?=\s)")


def prompt(fmt: str, document: str) -> tuple[str, str]:
    """The (system, user) messages that rephrase `document` into `fmt`."""
    if fmt not in _TASK:
        raise FelixError(f"unknown FinePhrase format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return _SYSTEM, f"{_TASK[fmt]}\n\nDocument:\n<<<\n{document.strip()}\n>>>"


def shape_problem(fmt: str, text: str, document: str) -> str | None:
    """Why `text` is not a usable `fmt` rephrasing of `document`, or None when it is."""
    body = text.strip()
    if len(body) < 40:
        return "empty or too short"
    if fmt == "table" and not (len(_TABLE_ROW.findall(body)) >= 3 and _TABLE_SEP.search(body)):
        return "no Markdown table (header, separator and a row)"
    if fmt == "math" and not (re.search(r"\d", body) and re.search(r"(?im)^\W*answer\b", body)):
        return "no worked numeric answer"
    pairs = min(len(re.findall(r"(?m)^\W*Q\s*[:.]", body)), len(re.findall(r"(?m)^\W*A\s*[:.]", body)))
    if fmt == "faq" and pairs < 2:
        return "fewer than two Q:/A: pairs"
    if fmt == "tutorial" and len({int(m) for m in _STEP.findall(body)}) < 2:
        return "fewer than two numbered steps"
    src, out = set(_WORDS.findall(document.lower())), _WORDS.findall(body.lower())
    if out and src and sum(w in src for w in out) / len(out) > 0.97 and len(out) > 0.8 * len(_WORDS.findall(document)):
        return "copies the document instead of rephrasing it"
    return None


SMALL_NUMBER = 20  # list markers, step numbers and small counts belong to the format, not to the facts


def invented_numbers(fmt: str, text: str, document: str) -> list[str]:
    """Numbers the rephrasing states that the document does not. A math problem computes new numbers, so
    there the check is the reverse: it must use at least one of the document's (reported as ["none"])."""
    src, out = match.numbers(document), match.numbers(text)
    if fmt == "math":
        return ["none of the document's numbers"] if src and not src & out else []
    return sorted(n for n in out - src if not (n.isdigit() and int(n) <= SMALL_NUMBER))


def clip_document(text: str, max_chars: int) -> str:
    """The document cut to `max_chars` at the last paragraph break before the limit, else line break, else
    sentence end, else word end, in its second half; only a document with none of them there is cut mid-word."""
    if len(text) <= max_chars:
        return text
    # A break that starts at the limit still ends a paragraph that fits; text[:cut] is at most max_chars.
    half = max_chars // 2
    cut = text[:max_chars + 2].rfind("\n\n")
    if cut < half:
        cut = text[:max_chars + 1].rfind("\n")
    for boundary in (_SENTENCE_END, _WORD_END):
        if cut < half:  # the last boundary that ends at half or later and keeps the text within the limit
            ends = [m.end() for m in boundary.finditer(text, max(half - 1, 0), max_chars + 1)]
            cut = ends[-1] if ends else -1
    return text[:cut] if cut >= half else text[:max_chars]


def doc_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def sample_rank(seed: int, did: str) -> bytes:
    """Where a document stands in the seeded sample order. A document's rank depends on its id alone, so
    adding documents to the sources keeps every earlier member of a `max_documents` sample except the few a
    new one with a smaller rank displaces, and none of their rephrasings is asked (paid) again."""
    return hashlib.blake2b(f"{seed}:{did}".encode(), digest_size=8).digest()


@dataclass
class SynthCorpus:
    """The usable source documents: the sample to rephrase, and every one of them whole for the mix."""

    documents: list[tuple[str, str]]  # (doc id, clipped text): what is rephrased, in sample order
    originals: list[tuple[str, str]]  # (doc id, whole text) of every usable document, in sample order
    held_out: int  # source documents left out because a val split on disk holds them
    heldout: Heldout | None  # what synth.heldout named and read (None: not set)
    near_copies: int = 0  # of held_out: near copies of a val document (not whitespace-exact ones)


def select_documents(cfg: HarvestConfig) -> SynthCorpus:
    """The source documents: long enough, duplicates (up to whitespace) dropped, those a val split of
    synth.heldout holds, or holds a near copy of, left out (with any other document whose clipped text, the
    one rephrased, is theirs), and the `max_documents` of them with the smallest seeded rank chosen for
    rephrasing."""
    s = cfg.synth
    if not s.sources:
        raise FelixError("synth.sources is empty: name .jsonl or .txt files of documents to rephrase")
    heldout = load_heldout(cfg)
    whole: dict[str, str] = {}  # text key -> stripped text
    held: dict[str, str] = {}
    near = 0
    for path in cfg.synth_source_files():
        for text in iter_documents(path):
            text = text.strip()
            if len(text) < s.min_chars or (key := text_key(text)) in whole or key in held:
                continue  # too short, or a copy (up to whitespace) of one before: that one stands
            if heldout is not None and (how := heldout.match(text, key)):
                held[key] = text
                near += how == "near"
            else:
                whole[key] = text
    # a document whose clipped text is a held-out one's would be asked the held-out document's prompt
    held_ids = {doc_id(clip_document(text, s.max_chars)) for text in held.values()}
    originals = [(did, text) for text in whole.values()
                 if (did := doc_id(clip_document(text, s.max_chars))) not in held_ids]
    held_out = len(held) + len(whole) - len(originals)
    if not originals:  # else a run asks nothing and a mix is written empty, both "successfully"
        why = f" that no val split of synth.heldout holds ({held_out} held out)" if held_out else ""
        raise FelixError(f"synth.sources hold no document of at least synth.min_chars ({s.min_chars}) "
                         f"characters{why}")
    originals.sort(key=lambda o: (sample_rank(s.seed, o[0]), o[1]))
    documents: dict[str, str] = {}  # first whole text per clipped id: two documents can clip to one
    for did, text in originals:
        if s.max_documents and len(documents) >= s.max_documents:
            break
        documents.setdefault(did, clip_document(text, s.max_chars))
    return SynthCorpus(list(documents.items()), originals, held_out, heldout, near)


def load_documents(cfg: HarvestConfig) -> list[tuple[str, str]]:
    """(doc id, clipped text) of the source documents to rephrase (see `select_documents`)."""
    return select_documents(cfg).documents


def synth_job(did: str, document: str, fmt: str, teacher: TeacherConfig,
              messages: tuple[str, str] | None = None) -> Job:
    """The request to rephrase one document into `fmt` by `teacher`; `messages`: its `prompt`, when made already."""
    system, user = messages or prompt(fmt, document)
    version = PROMPT_VERSION[fmt]
    key = request_key(kind="synth", format=fmt, document=did, teacher=teacher.identity, prompt_version=version,
                      system=system, user=user, max_tokens=teacher.max_tokens, temperature=teacher.temperature)
    return Job(key, "synth", fmt, did, teacher.name, teacher.identity, version, system, user,
               {"document": document}, None)


def synth_jobs(docs: list[tuple[str, str]], formats: list[str], teachers: list[TeacherConfig]) -> Iterator[Job]:
    """Every teacher's request for every document and format, made as they are read: a run keeps only those still
    owed (a resumed run of 400k requests held all of them, 1.5 KB each), and teachers share one prompt text."""
    for did, text in docs:
        for fmt in formats:
            messages = prompt(fmt, text)
            for t in teachers:
                yield synth_job(did, text, fmt, t, messages)


def judge_synth(job: Job, c: Completion) -> Judgement:
    """Malformed (asked again) when truncated or not the promised shape; otherwise kept, passing unless it
    states numbers the document does not (kept out of the mix then, like a gate failure)."""
    if c.truncated:
        return Judgement(False, reason=f"truncated at max_tokens ({c.output_tokens} tokens)")
    problem = shape_problem(job.task, c.text, job.input["document"])
    if problem:
        return Judgement(False, reason=f"malformed {job.task}: {problem}")
    invented = invented_numbers(job.task, c.text, job.input["document"])
    if invented:
        return Judgement(True, gate={"invented_numbers": invented}, passed=False,
                         reason="fidelity: " + ", ".join(invented[:8]))
    return Judgement(True, gate={"invented_numbers": []}, passed=True)


def heldout_report(corpus: SynthCorpus) -> dict[str, Any] | None:
    """What `synth.heldout` held out, for the JSON output (None: it is not set)."""
    if corpus.heldout is None:
        return None
    return {"documents_held_out": corpus.held_out, "near_copies": corpus.near_copies, **corpus.heldout.describe()}


NO_HELDOUT = ("note: synth.heldout is not set: a val document of a data mix that also shards synth.sources is "
              "rephrased and mixed into training text here (see docs/harvest.md)")


def run_synth(cfg: HarvestConfig, *, teachers: list[str] | None = None, retry_failed: bool = False,
              progress: bool = True) -> dict[str, Any]:
    """Rephrase every selected document into every configured format with every (or the named) teacher.

    Stopped by Ctrl-C or SIGTERM, it raises the KeyboardInterrupt with what it did so far (the same object,
    with "interrupted") as its `partial` attribute: the answers it stored are paid for, and worth reporting."""
    corpus = select_documents(cfg)
    docs = corpus.documents
    chosen = [cfg.teacher(n) for n in teachers] if teachers else cfg.teachers
    result: dict[str, Any] = {"store": str(cfg.store_path), "documents": len(docs), "formats": list(cfg.synth.formats),
                              "requests": len(docs) * len(cfg.synth.formats) * len(chosen),
                              "heldout": heldout_report(corpus), "interrupted": None}
    with HarvestStore(cfg.store_path) as store:
        result["reset"] = store.reset_gave_up("synth") if retry_failed else 0
        harvester = Harvester(cfg, store, judge_synth, secrets=teacher_secrets(cfg), progress=progress)
        return harvester.run_into(result, synth_jobs(docs, cfg.synth.formats, chosen), "synth")
