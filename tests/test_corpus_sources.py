"""How source files are read into documents (suffixes, chat records, line ends, BOMs, blank documents), and the
checks around them: `felix tokenizer train`'s inputs and vocabulary, `felix data verify --mix`."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
from test_trainer import write_config

from felix.chat import ChatDocument, chat_ids
from felix.cli import main
from felix.config import load_config
from felix.corpus import iter_documents
from felix.datamix import DataMix, MixSource
from felix.errors import FelixError
from felix.harvest import stored_answers
from felix.harvest_report import export_training, training_record
from felix.harvest_store import HarvestStore, Job
from felix.shards import ShardSet, write_shards
from felix.tokenizer import train_tokenizer
from felix.train_data import TrainData

CHAT = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Encode: it rained <|end|>"},
        {"role": "assistant", "content": '{"significance": "low"}'}]


def documents(shards: ShardSet) -> tuple[list[list[int]], ...]:
    """The token ids of each document of a shard set, `<|endoftext|>` included, per split (train, val)."""
    out = []
    for split in ("train", "val"):
        ids, docs = [int(i) for a in shards.tokens(split) for i in a], []
        while ids:
            end = ids.index(shards.meta["eot_id"]) + 1
            docs.append(ids[:end])
            ids = ids[end:]
        out.append(docs)
    return tuple(out)


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


# -- suffixes ----------------------------------------------------------------------------------------------
def test_jsonl_suffixes_in_any_case_and_ndjson_are_json_lines(tmp_path):
    """`.JSONL` and `.ndjson` were read as plain text: one document of raw JSON."""
    line = json.dumps({"text": "a document"}) + "\n"
    for name in ("upper.JSONL", "x.ndjson", "y.NDJson"):
        assert list(iter_documents(_write(tmp_path / name, line * 2))) == ["a document", "a document"]
    assert list(iter_documents(_write(tmp_path / "z.TXT", "plain\n"))) == ["plain\n"]


@pytest.mark.parametrize("name", ["records.json", "notes.md", "README", "corpus.jsonl.gz"])
def test_other_suffixes_are_refused_naming_the_file_and_the_accepted_ones(tmp_path, name, capsys):
    src = _write(tmp_path / name, json.dumps({"text": "x"}) + "\n")
    with pytest.raises(FelixError, match=rf"{name}: unknown source suffix .*\.jsonl, \.ndjson, \.txt"):
        list(iter_documents(src))
    assert main(["tokenizer", "train", "--input", str(src), "--vocab-size", "300", "--out",
                 str(tmp_path / "tok.json")]) == 2
    assert "unknown source suffix" in capsys.readouterr().err and not (tmp_path / "tok.json").exists()


def test_data_shard_checks_every_input_up_front(tiny_mix, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["data", "shard", "--input", str(tiny_mix.root / "code.jsonl"), str(tmp_path / "more.json"),
                 "--tokenizer", str(tiny_mix.tokenizer_path), "--out", str(out)]) == 2
    assert "more.json: no such file" in capsys.readouterr().err and not out.exists()


# -- chat records --------------------------------------------------------------------------------------------
def test_a_chat_record_is_one_document_in_the_serving_chat_template(tiny_mix, tmp_path):
    tok = tiny_mix.tokenizer
    src = _write(tmp_path / "sft.jsonl", json.dumps({"id": "e1", "messages": CHAT, "gate_passed": True}) + "\n"
                 + json.dumps({"text": "plain text"}) + "\n")
    chat, plain = iter_documents(src)
    assert isinstance(chat, ChatDocument) and plain == "plain text"
    turns = [(m["role"], m["content"]) for m in CHAT]
    assert chat == "".join(f"<|{r}|>{c}<|end|>" for r, c in turns)
    want = chat_ids(tok, turns, prompt=False) + [tok.eot_id]
    train, val = documents(write_shards(iter_documents(src), tok, tmp_path / "s"))
    assert sorted(train + val) == sorted([want, tok.encode("plain text") + [tok.eot_id]])
    # the prompt `felix serve` builds for the same chat (without the answer) is where the answer is learned
    served = chat_ids(tok, turns[:-1])
    answer = tok.encode(CHAT[2]["content"]) + [tok.special_ids["<|end|>"], tok.eot_id]
    assert want == served + answer
    # role markers are control tokens; a marker typed inside content stays text
    sp = tok.special_ids
    assert [i for i in want if i in sp.values()] == [sp["<|system|>"], sp["<|end|>"], sp["<|user|>"], sp["<|end|>"],
                                                     sp["<|assistant|>"], sp["<|end|>"], tok.eot_id]
    assert tok.decode(want[:-1]) == chat


@pytest.mark.parametrize("record, problem", [
    ({"text": "t", "messages": CHAT}, r'line 2: both "text" and "messages"'),
    ({"prompt": "p"}, r'line 2: expected an object with a string "text" field or a chat\'s "messages" list'),
    ({"messages": "hi"}, r"line 2: field \"messages\": 'messages' must be a non-empty list"),
    ({"messages": []}, r"line 2: field \"messages\": 'messages' must be a non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, r"line 2: field \"messages\": messages\[0\] needs a role in"),
    ({"messages": [{"role": "user", "content": 3}]},
     r"line 2: field \"messages\": messages\[0\].content must be a string or a list of text parts"),
    ({"messages": [{"role": "user", "content": "bad \ud800"}]}, r"line 2: field \"messages\": .*lone surrogate"),
])
def test_a_malformed_record_names_file_line_and_field(tmp_path, record, problem):
    src = _write(tmp_path / "bad.jsonl", json.dumps({"messages": CHAT}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(FelixError, match=rf"bad.jsonl: {problem}"):
        list(iter_documents(src))


def test_tokenizer_training_learns_chat_contents_not_role_marker_spellings(tmp_path):
    chat = [{"role": "user", "content": "what is the weather"}, {"role": "assistant", "content": "it rains"}]
    src = _write(tmp_path / "chats.jsonl", (json.dumps({"messages": chat}) + "\n") * 50)
    tok = train_tokenizer([src], 300, tmp_path / "tok.json")
    pieces = [tok.hf.id_to_token(i) for i in range(tok.vocab_size)]
    assert "Ġrains" in pieces and not [p for p in pieces if p not in tok.special_ids and "|" in p and len(p) > 1]


def test_harvest_export_shards_into_a_mix_source(tiny_mix, tmp_path, capsys):
    """The export was chat JSONL that no felix verb read: `data shard` said it lacked a "text" field."""
    with HarvestStore(tmp_path / "store.sqlite") as store:
        keys = set()
        for n in range(3):
            job = Job(f"k{n}", "harvest", "encoding", f"item-{n}", "t", "openai:t-model", "v1",
                      "You encode memories.", f"Encode memory {n}.")
            store.add(job)
            store.record_answer(job.key, status="ok", text="{}", output={"significance": n}, gate={}, passed=True,
                                reason=None, input_tokens=1, output_tokens=1, cost_usd=0.0, latency_s=0.0)
            keys.add(job.key)
        counts = export_training(store, tmp_path / "sft", keys)
        (exported,) = counts["files"]
        records = {a["item_id"]: training_record(a) for a in stored_answers(store)}
    assert main(["data", "shard", "--input", exported, "--tokenizer", str(tiny_mix.tokenizer_path), "--out",
                 str(tmp_path / "shards" / "sft"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["train"]["documents"] + out["val"]["documents"] == 3
    shutil.copytree(tiny_mix.root / "shards" / "code", tmp_path / "shards" / "code")
    mix = tmp_path / "mix.yaml"
    DataMix(sources=[MixSource(name="code", shards="shards/code", weight=0.9),
                     MixSource(name="sft", shards="shards/sft", weight=0.1)]).write(mix)
    assert main(["data", "verify", "--mix", str(mix), "--tokenizer", str(tiny_mix.tokenizer_path)]) == 0
    DataMix.load(mix).validate_against(tiny_mix.tokenizer)  # what `felix train` checks
    tok = tiny_mix.tokenizer
    want = sorted(chat_ids(tok, [(m["role"], m["content"]) for m in records[f"item-{n}"]["messages"]], prompt=False)
                  + [tok.eot_id] for n in range(3))
    train, val = documents(ShardSet.open(tmp_path / "shards" / "sft"))
    assert sorted(train + val) == want


# -- line ends, byte order marks, blank documents -------------------------------------------------------------
def test_crlf_bom_and_blank_documents_read_alike_in_txt_and_jsonl(tmp_path):
    crlf = tmp_path / "win.txt"
    crlf.write_bytes(b"\xef\xbb\xbffirst\r\nline\r\n<|endoftext|>\r\n  \r\n<|endoftext|>\r\nsecond\r\n")
    assert list(iter_documents(crlf)) == ["first\nline", "second\n"]  # no "\r", no BOM, blank one skipped
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "one"}).encode() + b"\r\n"
                    + json.dumps({"text": " \n\t "}).encode() + b"\n" + json.dumps({"text": "two"}).encode())
    assert list(iter_documents(bom)) == ["one", "two"]
    (tmp_path / "blank.jsonl").write_text('{"text": "  "}\n{"text": ""}\n', encoding="utf-8")
    with pytest.raises(FelixError, match=r'blank.jsonl: no documents \(every "text" is empty or whitespace\)'):
        list(iter_documents(tmp_path / "blank.jsonl"))
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf\r\n")
    with pytest.raises(FelixError, match="bom.txt: file is empty"):
        list(iter_documents(tmp_path / "bom.txt"))



def test_a_txt_run_without_separators_is_cut_at_line_ends_not_held_whole(tmp_path, monkeypatch):
    """Before: a .txt file without <|endoftext|> lines was one document, however large: a 50 GB file was held in
    memory whole (~3x while sharded). Now a run past the cap is cut at the next line end, with one warning; the
    pieces are the file's text, in order, and separators still end documents where the file has them."""
    import felix.corpus as corpus

    monkeypatch.setattr(corpus, "TXT_MAX_DOCUMENT_CHARS", 20)
    lines = [f"line number {i}\n" for i in range(10)]  # 15 characters each
    path = tmp_path / "big.txt"
    path.write_text("".join(lines[:6]) + "<|endoftext|>\n" + "".join(lines[6:]), encoding="utf-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = list(iter_documents(path))
    assert docs == ["".join(lines[0:2]), "".join(lines[2:4]), "".join(lines[4:6]), "".join(lines[6:8]),
                    "".join(lines[8:10])]
    assert [str(w.message).split(":")[:2] for w in caught] == [[str(path), " line 2"]]
    assert "without a <|endoftext|> line" in str(caught[0].message)

# -- tokenizer train: inputs and vocabulary -----------------------------------------------------------------
def test_a_symlink_loop_input_is_named_as_one(tmp_path, capsys):
    loop = tmp_path / "loop.txt"
    os.symlink(loop, loop)
    assert main(["tokenizer", "train", "--input", str(loop), "--vocab-size", "300", "--out",
                 str(tmp_path / "tok.json")]) == 2
    err = capsys.readouterr().err
    assert "loop.txt: a symlink loop" in err and "no such file" not in err
    os.symlink(tmp_path / "gone.txt", tmp_path / "dangling.txt")
    with pytest.raises(FelixError, match=r"dangling.txt: no such file \(a dangling symlink\)"):
        train_tokenizer([tmp_path / "dangling.txt"], 300, tmp_path / "tok.json")
    out_loop = tmp_path / "out.json"
    os.symlink(out_loop, out_loop)
    with pytest.raises(FelixError, match="out.json"):  # was a RuntimeError from Path.resolve
        train_tokenizer([_write(tmp_path / "a.txt", "text")], 300, out_loop)


def test_a_vocabulary_far_short_of_the_asked_size_is_warned_about(tmp_path, capsys):
    src = _write(tmp_path / "small.txt", "a small input, too small for a big vocabulary " * 20)
    assert main(["tokenizer", "train", "--input", str(src), "--vocab-size", "32768", "--out",
                 str(tmp_path / "tok.json"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["vocab_size"]
    assert got < 1000
    with pytest.warns(UserWarning, match=rf"yields only {got:,} tokens, not the 32,768 asked for"):
        train_tokenizer([src], 32768, tmp_path / "tok2.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_tokenizer([src], got, tmp_path / "tok3.json")  # what the input gives: nothing to say


def test_train_warns_when_the_model_vocabulary_dwarfs_the_tokenizers(tiny_mix, tmp_path):
    n = tiny_mix.tokenizer.vocab_size
    cfg = load_config(write_config(tmp_path, tiny_mix), ["model.vocab_size=4096"])
    with pytest.warns(UserWarning, match=rf"model.vocab_size \(4,096\) is far larger than the tokenizer's "
                                         rf"\({n}, .*{4096 - n:,} ids no text has never train"):
        TrainData.open(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainData.open(load_config(write_config(tmp_path, tiny_mix), [f"model.vocab_size={n + 32}"]))
    with pytest.raises(FelixError, match="smaller than the tokenizer's"):
        TrainData.open(load_config(write_config(tmp_path, tiny_mix), [f"model.vocab_size={n - 1}"]))


# -- data verify --mix ---------------------------------------------------------------------------------------
def test_verify_refuses_a_mix_of_two_tokenizers_as_train_does(tiny_mix, tmp_path, capsys):
    other = train_tokenizer([_write(tmp_path / "o.txt", "other words entirely " * 100)], 300, tmp_path / "o.json")
    write_shards(["other words"] * 4, other, tmp_path / "other")
    mix = tmp_path / "mix.yaml"
    DataMix(sources=[MixSource(name="code", shards=tiny_mix.root / "shards" / "code", weight=1),
                     MixSource(name="other", shards=tmp_path / "other", weight=1)]).write(mix)
    assert main(["data", "verify", "--mix", str(mix)]) == 2
    assert (f"source 'other' ({tmp_path / 'other'}) was tokenized with a different tokenizer than source 'code'"
            in capsys.readouterr().err)
    assert main(["data", "verify", "--mix", str(tiny_mix.mix_path), "--tokenizer", str(tmp_path / "o.json")]) == 2
    assert "different tokenizer than" in capsys.readouterr().err
    assert main(["data", "verify", "--mix", str(tiny_mix.mix_path), "--tokenizer", str(tiny_mix.tokenizer_path)]) == 0


def test_one_shard_directory_under_two_names_is_refused(tiny_mix, tmp_path, capsys):
    code = tiny_mix.root / "shards" / "code"
    os.symlink(code, tmp_path / "alias")
    mix = tmp_path / "mix.yaml"
    DataMix(sources=[MixSource(name="code", shards=code, weight=1),
                     MixSource(name="again", shards=tmp_path / "alias", weight=1)]).write(mix)
    assert main(["data", "verify", "--mix", str(mix)]) == 2
    assert "sources 'code' and 'again' name the same shard directory" in capsys.readouterr().err
    with pytest.raises(FelixError, match="name the same shard directory"):
        DataMix.load(mix)
