"""Drive `felix harvest` / `felix synth` at scale against local fake providers (docs/benchmarks.md, "Harvest and
synth at scale"). Subcommands:

  items N OUT.jsonl         N simulated task items with gold references (distinct inputs)
  docs N OUT.jsonl          N distinct documents of 300-1,200 characters for synth.sources
  serve ITEMS|- URLS.json   three fake providers (openai, anthropic, gemini) answering harvest prompts with the
                            gold reference of ITEMS and synth prompts with a well-shaped text; writes their URLs
                            to URLS.json and the count of answers so far to URLS.json.answered every 0.1 s
  config URLS OUT.yaml      a config naming the three teachers (--items FILE for harvest, --docs FILE for synth,
                            --teachers, --concurrency, --max-chars, --batch)
  monitor STORE PID         every few seconds: answers the server sent, attempts stored, rate, RSS of PID, db
                            and WAL size

Run with PYTHONPATH set to the checkout and tests/ (the servers are tests/provider_servers.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import sys
import time
from pathlib import Path

import yaml

from felix.tasks.prompts import render
from felix.tasks.schemas import TASKS
from felix.tasks.simulate import CATEGORIES, simulate
from felix.tasks.suite import build_reference

_NUM = re.compile(r"\d+")


def write_items(n: int, out: Path) -> int:
    per = -(-n // (len(TASKS) * len(CATEGORIES)))
    per += per % 2  # twins come in pairs
    seen, count = set(), 0
    with out.open("w", encoding="utf-8") as f:
        for task in TASKS:
            for cat in CATEGORIES:
                for d in simulate(task, cat, 7, per, prefix="big"):
                    key = json.dumps(d.item["input"], sort_keys=True)
                    if key not in seen:  # the same input twice is one request
                        seen.add(key)
                        f.write(json.dumps({**d.item, "reference": build_reference(task, d.item["input"], d.truth)})
                                + "\n")
                        count += 1
    return count


def write_docs(n: int, out: Path) -> None:
    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(20000)]
    with out.open("w", encoding="utf-8") as f:
        for i in range(n):
            target, paras, length = rng.randint(300, 1200), [], 0
            while length < target:
                words = [rng.choice(vocab) if rng.random() > 0.08 else str(rng.randint(21, 99999))
                         for _ in range(rng.randint(15, 60))]
                paras.append(" ".join(words).capitalize() + ".")
                length += len(paras[-1]) + 2
            f.write(json.dumps({"text": f"Document {i}.\n\n" + "\n\n".join(paras)}) + "\n")


def serve(items: str, urls: Path) -> None:
    from provider_servers import ProviderServer

    gold = {}
    if items != "-":
        with open(items, encoding="utf-8") as f:
            for line in f:
                it = json.loads(line)
                gold[render(it["task"], it["input"])[1]] = json.dumps(it["reference"])

    def respond(req) -> str:
        if req.user in gold:
            return gold[req.user]
        doc = req.user.split("<<<", 1)[-1]  # a synth prompt: a shaped answer using the document's first number
        n = (m.group(0) if (m := _NUM.search(doc)) else "3")
        words = " ".join(doc.split()[:60])
        if req.user.startswith("Pull the key facts"):
            return f"| fact | value |\n| --- | --- |\n| first | {n} |\n| words | {words[:200]} |\n" \
                   f"Question: what is first?\nAnswer: {n}"
        if req.user.startswith("Write a word problem"):
            return f"A problem with {n} things: {words[:200]}. Step 1: take {n}. Step 2: keep it.\nAnswer: {n}"
        if req.user.startswith("Write a list of questions"):
            return f"Q: What is this about?\nA: {words[:200]}\nQ: Which number?\nA: {n}"
        return f"You will learn about {words[:120]}.\n1. Read about {n}.\n2. Think about {words[:80]}.\n3. Done."

    class Lean(ProviderServer):
        """Keeps no per-request records, so the server's memory stays flat over 100k+ requests."""

        def _record(self, req) -> None:
            """Nothing recorded (the base class keeps every request)."""

        def _handle(self, h, method: str) -> None:
            path = h.path.split("?", 1)[0]
            try:
                body = h.read_json() if method == "POST" else {}
            except ValueError:
                self._error(h, 400, "bad json")
                return
            if not getattr(self, f"_{self.protocol}_route")(h, method, path, body):
                self._error(h, 404, "no route")

    servers = [Lean(p, responder=respond, batch_polls_before_end=0).start() for p in ("openai", "anthropic", "gemini")]
    urls.write_text(json.dumps({s.protocol: s.url for s in servers}))
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    with open(f"{urls}.answered", "w") as log:
        while True:
            time.sleep(0.1)
            log.write(f"{time.time():.1f} {sum(s.answered for s in servers)}\n")
            log.flush()


def config(urls: Path, out: Path, a: argparse.Namespace) -> None:
    url = json.loads(urls.read_text())
    teachers = []
    for name, provider in [("oa", "openai"), ("an", "anthropic"), ("ge", "gemini")][:a.teachers]:
        t = {"name": name, "provider": provider, "model": f"{name}-model", "timeout": 60, "max_tokens": 2048,
             "base_url": url[provider] + ("/v1" if provider == "openai" else ""), "concurrency": a.concurrency,
             "price": {"input": 1.0, "output": 2.0}}
        if a.batch and provider != "openai":
            t.update(mode="batch", batch_poll_seconds=0.1)
        teachers.append(t)
    cfg = {"store": "store.sqlite", "teachers": teachers,
           "retry": {"max_retries": 2, "max_attempts": 2, "backoff_base": 0.0, "backoff_max": 0.01}}
    if a.items:
        cfg["items"] = [{"file": str(Path(a.items).resolve())}]
    if a.docs:
        cfg["synth"] = {"sources": [str(Path(a.docs).resolve())], "max_chars": a.max_chars}
    out.write_text(yaml.safe_dump(cfg))


def monitor(store: str, pid: int, every: float, answered: str | None) -> None:
    def rss() -> int | None:
        try:
            return next(int(line.split()[1]) // 1024 for line in open(f"/proc/{pid}/status")
                        if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            return None

    def served() -> int:
        try:
            return int(open(answered).read().split()[-1]) if answered else -1
        except (OSError, ValueError, IndexError):
            return -1

    t0, last, s0 = time.time(), (time.time(), 0), served()
    while (r := rss()) is not None:
        n = None
        with contextlib.suppress(sqlite3.Error):  # the run may hold the store busy: sampled next time
            db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=1)
            n = db.execute("SELECT COUNT(*) FROM attempts").fetchone()[0]
            db.close()
        now = time.time()
        size = os.path.getsize(store) if os.path.exists(store) else 0
        wal = os.path.getsize(store + "-wal") if os.path.exists(store + "-wal") else 0
        rate = (n - last[1]) / (now - last[0]) if n is not None else 0.0
        print(f"t={now - t0:6.1f}s served={served() - s0} attempts={n} rate={rate:7.1f}/s rss={r}MB "
              f"db={size / 1e6:.1f}MB wal={wal / 1e6:.1f}MB", flush=True)
        last = (now, n or 0)
        time.sleep(every)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("items", "docs"):
        s = sub.add_parser(name)
        s.add_argument("n", type=int)
        s.add_argument("out", type=Path)
    s = sub.add_parser("serve")
    s.add_argument("items")
    s.add_argument("urls", type=Path)
    s = sub.add_parser("config")
    s.add_argument("urls", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--items")
    s.add_argument("--docs")
    s.add_argument("--teachers", type=int, default=3)
    s.add_argument("--concurrency", type=int, default=16)
    s.add_argument("--max-chars", type=int, default=6000)
    s.add_argument("--batch", action="store_true", help="anthropic and gemini in batch mode")
    s = sub.add_parser("monitor")
    s.add_argument("store")
    s.add_argument("pid", type=int)
    s.add_argument("--every", type=float, default=5.0)
    s.add_argument("--answered", help="the URLS.json.answered file serve writes")
    a = p.parse_args()
    if a.cmd == "items":
        print(write_items(a.n, a.out))
    elif a.cmd == "docs":
        write_docs(a.n, a.out)
    elif a.cmd == "serve":
        serve(a.items, a.urls)
    elif a.cmd == "config":
        config(a.urls, a.out, a)
    else:
        monitor(a.store, a.pid, a.every, a.answered)


if __name__ == "__main__":
    main()
