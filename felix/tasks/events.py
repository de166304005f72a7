"""Generators of single developer-work events, each rendered as a capture a person would take
(terminal session, commit, chat snippet, review notes, benchmark run) with its ground truth."""

from __future__ import annotations

import random

from felix.tasks.world import (
    NOTES,
    PROJECTS,
    Event,
    basename,
    day,
    encoding_truth,
    hexhash,
    people,
    pick_file,
    short_hash,
    stack_trace,
)


def crash(rng: random.Random) -> Event:
    """A service or test run dying with a traceback."""
    proj = rng.choice(PROJECTS)
    path, func = pick_file(rng, proj)
    cpath = rng.choice(sorted(set(proj.files) - {path}))  # the caller lives elsewhere: no self-call frames
    cfunc = rng.choice(proj.files[cpath])
    cr = rng.choice(proj.crashes)
    line, cline = rng.randrange(40, 420), rng.randrange(30, 300)
    (first, last), = people(rng, 1)
    home = f"/home/{first.lower()}/src/{proj.name}"
    passed, failed = rng.randrange(30, 400), rng.randrange(1, 4)
    secs = f"{rng.randrange(2, 60)}.{rng.randrange(10, 99)}"
    trace = stack_trace(proj, path, func, line, cr, (cpath, cfunc, cline), home)
    cmd = {"go": f"go test ./{path.rsplit('/', 1)[0]}/...", "python": "pytest -q -x",
           "typescript": "npm test -- --runInBand"}[proj.lang]
    tail = {"go": f"FAIL\t{proj.module}/{path.rsplit('/', 1)[0]}\t{secs}s",
            "python": f"{failed} failed, {passed} passed in {secs}s",
            "typescript": f"Tests:       {failed} failed, {passed} passed, {failed + passed} total\n"
                          f"Time:        {secs} s"}
    capture = (f"{first.lower()}@devbox:~/src/{proj.name}$ {cmd}\n{trace}\n{tail[proj.lang]}\n\n"
               f"# {first}: started after rebasing on main this morning, {cr.cause}?")
    ref = f"{basename(path)}:{line}"
    nums = [secs] if proj.lang == "go" else [str(failed), str(passed), secs]
    gist = f"{proj.name}: {cr.error.split(':')[0]} in {func} at {ref}"[:80]
    err_name = cr.error.split("\n")[0]
    truth = encoding_truth(
        gist, f"A {proj.name} test run failed in {func} ({ref}) with {err_name}.",
        [f"{first} hit the failure after rebasing on main; the run stopped after {secs}s.",
         f"The likely cause is {cr.cause}. It is not fixed yet."],
        [proj.name, cr.concept, "test failure", proj.lang],
        topics=[(cr.concept, f"bugs/{cr.concept.replace(' ', '-')}")],
        entities=[(first, "person", "ran the tests"), (path, "file", f"raises at line {line}"),
                  (func, "function", "where the error is raised")],
        actions=[("ran", "the test suite", cmd)],
        causality=[("caused_by", f"{err_name} caused by {cr.cause}")],
        significance="important", tone="frustrating", outcome="failure", salience=0.7 + rng.randrange(0, 20) / 100)
    memory = f"{proj.name} tests crashed with {err_name} in {func} at {ref}, apparently from {cr.cause}."
    return Event("crash", capture, memory, [first, proj.name, func, ref, *nums], [first], truth,
                 question=f"What crashed in {func} and where?",
                 answer=[f"{func} in {proj.name} crashed with {err_name} at {ref}.",
                         f"The suspected cause was {cr.cause}, and it had not been fixed at the time."],
                 answer_must=[func, ref], topic=f"the {cr.concept} crash in {func}",
                 scope=[proj.name, proj.service])


def commit(rng: random.Random) -> Event:
    """A fix landing: `git show --stat` output with hash, author, message and diffstat."""
    proj = rng.choice(PROJECTS)
    path, func = pick_file(rng, proj)
    cr = rng.choice(proj.crashes)
    (first, last), = people(rng, 1)
    full = hexhash(rng)
    short, issue = full[:7], rng.randrange(100, 2000)
    line = rng.randrange(40, 420)
    ins, dels, tins = rng.randrange(2, 12), rng.randrange(1, 6), rng.randrange(12, 60)
    when = day(rng)
    test = path.replace(".go", "_test.go") if proj.lang == "go" else (
        f"tests/test_{basename(path)}" if proj.lang == "python" else path.replace(".ts", ".test.ts"))
    w = max(len(path), len(test)) + 1
    bar = lambda a, d: "+" * min(a, 40) + "-" * d
    capture = (f"commit {full}\nAuthor: {first} {last} <{first.lower()}@{proj.name}.dev>\n"
               f"Date:   {when:%a %b %-d %H:%M:%S %Y} +0100\n\n"
               f"    {basename(path).split('.')[0]}: guard against {cr.concept} in {func}\n\n"
               f"    {func} failed with \"{cr.error.split(chr(10))[0]}\" when given\n"
               f"    {cr.cause}; the bad line was {basename(path)}:{line}. Handle it\n"
               f"    explicitly and add a regression test.\n\n    Fixes #{issue}\n\n"
               f" {path.ljust(w)}| {ins + dels:>2} {bar(ins, dels)}\n {test.ljust(w)}| {tins:>2} {bar(tins, 0)}\n"
               f" 2 files changed, {ins + tins} insertions(+), {dels} deletions(-)")
    ref = f"{basename(path)}:{line}"
    truth = encoding_truth(
        f"{short} fixes {cr.concept} in {func} (#{issue})",
        f"{first} committed {short}, which fixes {cr.concept} in {func} at {ref} and closes #{issue}.",
        [f"The crash came from {cr.cause}.",
         f"The fix changes {path} and adds a regression test: {ins + tins} insertions, {dels} deletions."],
        [proj.name, cr.concept, "bug fix", "regression test"],
        topics=[(cr.concept, f"bugs/{cr.concept.replace(' ', '-')}"), ("testing", "engineering/testing")],
        entities=[(first, "person", "commit author"), (short, "commit", f"fixes #{issue}"),
                  (func, "function", "fixed")],
        actions=[("fixed", func, f"guard against {cr.concept}"), ("added", "regression test", test)],
        causality=[("fixes", f"{short} removes the {cr.concept} at {ref}")],
        significance="notable", tone="satisfying", outcome="success", salience=0.5 + rng.randrange(0, 20) / 100)
    memory = f"{first} fixed {cr.concept} in {func} ({ref}) in commit {short}, closing #{issue}."
    return Event("commit", capture, memory, [first, short, func, ref, str(issue), str(ins + tins)], [first], truth,
                 question=f"Which commit fixed issue #{issue}, and what did it change?",
                 answer=[f"Commit {short} by {first} fixed #{issue}.",
                         f"It guarded against {cr.concept} in {func} at {ref}."],
                 answer_must=[short, str(issue), ref], topic=f"issue #{issue}", scope=[proj.name, proj.service])


def chat(rng: random.Random) -> Event:
    """A chat thread where a regression is explained and a decision taken."""
    proj = rng.choice(PROJECTS)
    path, func = pick_file(rng, proj)
    (a, al), (b, bl) = people(rng, 2)
    before, after = rng.randrange(90, 300), rng.randrange(600, 2400)
    cap, line, version = rng.choice([64, 128, 256, 512]), rng.randrange(40, 420), f"1.{rng.randrange(2, 9)}"
    when = day(rng)
    t = lambda m: f"{(when.hour * 60 + when.minute + m) // 60:02d}:{(when.minute + m) % 60:02d}"
    capture = (f"#{proj.name}-dev · {when:%a %-d %b}\n"
               f"{a} {al}  {t(0)}\np95 on {proj.service} is {after}ms since yesterday's deploy, was ~{before}ms\n"
               f"{b} {bl}  {t(2)}\nit's {func}, it walks every item per request now ({basename(path)}:{line})\n"
               f"{a} {al}  {t(3)}\nok let's cap it at {cap} and revisit after the {version} release. "
               f"{b} can you take it?\n{b} {bl}  {t(4)}\non it 👍")
    ref = f"{basename(path)}:{line}"
    truth = encoding_truth(
        f"{proj.service} p95 {before}->{after}ms; cap {func} at {cap}",
        f"{proj.service} p95 latency rose from about {before}ms to {after}ms after a deploy; {func} is the cause.",
        [f"{b} traced it to {func} walking every item per request ({ref}).",
         f"{a} and {b} agreed to cap it at {cap} and revisit after the {version} release; {b} owns the change."],
        [proj.name, "latency regression", "performance", "decision"],
        topics=[("performance", "engineering/performance")],
        entities=[(a, "person", "reported the regression"), (b, "person", "owns the fix"),
                  (func, "function", "cause of the regression"), (proj.service, "service", "affected")],
        actions=[("cap", func, f"at {cap}"), ("revisit", "the cap", f"after {version}")],
        causality=[("caused_by", f"the p95 regression is caused by {func} walking every item")],
        significance="important", tone="concerning", outcome="ongoing", salience=0.6 + rng.randrange(0, 20) / 100)
    memory = (f"{proj.service} p95 went from {before}ms to {after}ms because {func} ({ref}) walks every item; "
              f"{a} and {b} decided to cap it at {cap} until the {version} release.")
    return Event("chat", capture, memory, [a, b, func, ref, str(before), str(after), str(cap), version], [a, b], truth,
                 question=f"Why did {proj.service} get slower, and what was decided?",
                 answer=[f"{proj.service} p95 rose from {before}ms to {after}ms because {func} ({ref}) walks "
                         f"every item per request.",
                         f"{a} and {b} decided to cap it at {cap} and revisit after the {version} release."],
                 answer_must=[str(before), str(after), str(cap), func], topic=f"the {proj.service} latency",
                 scope=[proj.name, proj.service])


def review(rng: random.Random) -> Event:
    """Review notes on a pull request, one comment per file:line."""
    proj = rng.choice(PROJECTS)
    (path, func), (path2, func2) = pick_file(rng, proj), pick_file(rng, proj)
    (r, rl), (au, _) = people(rng, 2)
    pr, l1, l2 = rng.randrange(100, 900), rng.randrange(40, 300), rng.randrange(40, 300)
    retries, cap = rng.randrange(5, 12), rng.choice([60, 120, 300, 600])
    capture = (f"Review: PR #{pr} \"{func}: retry failed writes with backoff\" by {au} ({proj.name})\n"
               f"Reviewer: {r} {rl} · changes requested\n\n"
               f"{path}:{l1}  the delay doubles with no ceiling; after {retries} retries we'd wait for ages. "
               f"Cap at {cap} s?\n"
               f"{path2}:{l2}  {func2} swallows the exception, so callers never see the failure. Re-raise.\n"
               f"nit: the test name says 'caps' but nothing asserts the cap.\n\n"
               f"Otherwise fine, happy to re-review today.")
    r1, r2 = f"{basename(path)}:{l1}", f"{basename(path2)}:{l2}"
    truth = encoding_truth(
        f"PR #{pr} review: cap backoff at {cap}s, stop swallowing errors",
        f"{r} requested changes on {au}'s PR #{pr}, which adds retry with backoff to {func}.",
        [f"At {r1} the delay has no ceiling ({retries} retries already wait too long); {r} suggests {cap} s.",
         f"At {r2} {func2} swallows the exception and should re-raise; a test should assert the cap."],
        [proj.name, "code review", "retry", "backoff", "error handling"],
        topics=[("code review", "engineering/review"), ("retries", "engineering/reliability")],
        entities=[(r, "person", "reviewer"), (au, "person", "PR author"), (func2, "function", "swallows errors")],
        actions=[("requested changes", f"PR #{pr}", "cap the backoff, re-raise errors")],
        causality=[("risk", "uncapped backoff makes retries wait far too long")],
        significance="routine", tone="neutral", outcome="ongoing", salience=0.4 + rng.randrange(0, 20) / 100)
    memory = f"{r} asked {au} to cap the backoff in PR #{pr} at {cap} s ({r1}) and to re-raise in {func2} ({r2})."
    return Event("review", capture, memory, [r, au, r1, r2, str(pr), str(retries), str(cap)], [r, au], truth,
                 question=f"What did the review of PR #{pr} ask for?",
                 answer=[f"{r} asked for the backoff in PR #{pr} to be capped at {cap} s ({r1}).",
                         f"The review also asked {func2} to re-raise instead of swallowing the exception ({r2})."],
                 answer_must=[str(pr), str(cap), r1], topic=f"PR #{pr}", scope=[proj.name, proj.service])


def bench(rng: random.Random) -> Event:
    """A load test full of numbers (wrk output plus a one-line note): the dense-number capture."""
    proj = rng.choice(PROJECTS)
    (first, _), = people(rng, 1)
    conns, secs = rng.choice([64, 128, 256]), rng.choice([30, 60])
    avg = rng.randrange(1200, 9000) / 100
    mx, rps = rng.randrange(20000, 90000) / 100, rng.randrange(90000, 900000) / 100
    reqs, non2xx, old = int(rps * secs), rng.randrange(3, 900), rng.randrange(900000, 1500000) / 100
    route = rng.choice({"tidepool": ["/v1/recall", "/v1/episodes"], "larkspur": ["/api/jobs", "/api/uploads"],
                        "wayfarer": ["/api/cart/total", "/v1/search"]}[proj.name])
    capture = (f"$ wrk -t8 -c{conns} -d{secs}s http://localhost:8080{route}\n"
               f"Running {secs}s test @ http://localhost:8080{route}\n  8 threads and {conns} connections\n"
               f"  Thread Stats   Avg      Stdev     Max   +/- Stdev\n"
               f"    Latency    {avg}ms   {avg / 3:.2f}ms {mx}ms   87.12%\n"
               f"    Req/Sec   {rps / 8:.2f}     96.02     1.02k    71.40%\n"
               f"  {reqs} requests in {secs}.04s, 61.22MB read\n  Non-2xx or 3xx responses: {non2xx}\n"
               f"Requests/sec:   {rps}\nTransfer/sec:      2.04MB\n\n"
               f"{first}: {proj.service} at {rps} req/s vs {old} before the ORM change; the {non2xx} non-2xx are 503s")
    nums = [str(conns), str(avg), str(mx), str(reqs), str(non2xx), str(rps), str(old)]
    truth = encoding_truth(
        f"{proj.service} {route}: {rps} req/s (was {old}), {non2xx} errors",
        f"A {secs}s wrk run against {proj.service} {route} reached {rps} req/s, down from {old} before the ORM change.",
        [f"With {conns} connections, average latency was {avg}ms and the maximum {mx}ms over {reqs} requests.",
         f"{non2xx} responses were non-2xx; {first} notes they are 503s."],
        [proj.name, "load test", "throughput", "regression"],
        topics=[("performance", "engineering/performance")],
        entities=[(first, "person", "ran the load test"), (proj.service, "service", "under test"),
                  ("wrk", "tool", "load generator")],
        actions=[("load tested", route, f"{conns} connections for {secs}s")],
        causality=[("caused_by", "the throughput drop followed the ORM change")],
        significance="important", tone="concerning", outcome="failure", salience=0.6 + rng.randrange(0, 20) / 100)
    memory = (f"{first}'s wrk run on {proj.service} {route}: {rps} req/s (was {old}), avg {avg}ms, max {mx}ms, "
              f"{non2xx} non-2xx of {reqs} requests.")
    return Event("bench", capture, memory, list(dict.fromkeys([first, *nums])), [first], truth,
                 question=f"How did {proj.service} do in the last load test?",
                 answer=[f"{proj.service} served {rps} req/s on {route}, down from {old} before the ORM change.",
                         f"Average latency was {avg}ms with a maximum of {mx}ms, and {non2xx} of {reqs} "
                         f"requests were non-2xx."],
                 answer_must=[str(rps), str(old), str(avg), str(non2xx)], topic=f"{proj.service} throughput",
                 scope=[proj.name, proj.service])


def note(rng: random.Random) -> Event:
    """A personal note: out of the developer domain, still a memory to encode."""
    text, names, gist, concepts = rng.choice(NOTES)
    vals = {"h": rng.randrange(8, 11), "n": rng.randrange(20, 400), "m": rng.randrange(20, 60),
            "k": rng.randrange(3, 12), "w": rng.randrange(13, 18),
            "x": rng.randrange(330, 390)}
    capture = text.format(**vals)
    nums = [str(vals[k]) for k in "hnmkwx" if f"{{{k}}}" in text]
    truth = encoding_truth(
        gist, f"Personal note: {gist}.", ["A personal note, not related to software work."],
        concepts, topics=[(concepts[0], f"personal/{concepts[0]}")],
        entities=[(n, "place" if n in ("Leiden", "Rotterdam", "Hvar", "Pine Street") else "person", "mentioned")
                  for n in names],
        actions=[], causality=[], significance="trivial", tone="neutral", outcome="unknown",
        salience=0.1 + rng.randrange(0, 15) / 100)
    return Event("note", capture, capture, list(dict.fromkeys([*names, *nums])), [], truth, topic=gist)


MINIMAL = [("flaky {test} again", "flaky test", "frustrating", "failure"),
           ("{service} deploy green finally", "deploy", "satisfying", "success"),
           ("lunch with {person}", "social", "neutral", "unknown"),
           ("PR #{n} merged", "merge", "satisfying", "success"),
           ("CI red: lint on {file}", "ci", "frustrating", "failure")]


def minimal(rng: random.Random) -> Event:
    """A capture of at most five words: the encoding has to stay short and add nothing."""
    template, concept, tone, outcome = rng.choice(MINIMAL)
    proj = rng.choice(PROJECTS)
    path, func = pick_file(rng, proj)
    (first, _), = people(rng, 1)
    n = rng.randrange(100, 900)
    test = f"test_{func.lower().strip('_').split('.')[-1]}"
    text = template.format(test=test, service=proj.service, person=first, n=n, file=basename(path))
    must = {"test": [test], "service": [proj.service], "person": [first], "n": [str(n)], "file": [basename(path)]}
    slot = template.split("{")[1].split("}")[0]
    subject = {"test": test, "service": f"the {proj.service} deploy", "person": f"lunch with {first}",
               "n": f"PR #{n}", "file": f"lint on {basename(path)}"}[slot]
    truth = encoding_truth(
        text[:1].upper() + text[1:], text[:1].upper() + text[1:] + ".", ["No further detail was recorded."],
        [concept], topics=[(concept, f"work/{concept.replace(' ', '-')}")], entities=[], actions=[], causality=[],
        significance="trivial", tone=tone, outcome=outcome, salience=0.15)
    return Event("minimal", text, text, must[slot], [first] if slot == "person" else [], truth,
                 topic=subject)


def verify_run(rng: random.Random, passed: bool) -> Event:
    """Re-running a test many times after a fix. Called twice with equal seeds and opposite `passed`,
    it gives the adversarial twins: the same session, one line apart, opposite outcomes."""
    proj = rng.choice(PROJECTS)
    path, func = pick_file(rng, proj)
    cr = rng.choice(proj.crashes)
    (first, _), = people(rng, 1)
    h, issue, line = short_hash(rng), rng.randrange(100, 2000), rng.randrange(40, 420)
    runs, secs = rng.choice([20, 50, 100]), f"{rng.randrange(1, 9)}.{rng.randrange(10, 99)}"
    test = f"test_{func.lower().split('.')[-1].strip('_')}"
    ref = f"{basename(path)}:{line}"
    prompt = f"{first.lower()}@devbox:~/src/{proj.name}$"
    head = (f"{prompt} git log -1 --oneline\n{h} {basename(path).split('.')[0]}: guard against {cr.concept} "
            f"in {func} (#{issue})\n")
    if proj.lang == "go":
        pkg = f"{proj.module}/{path.rsplit('/', 1)[0]}"
        cmd = f"{prompt} go test ./{path.rsplit('/', 1)[0]}/ -run Test{func[:1].upper()}{func[1:]} -count={runs}\n"
        body = (f"ok  \t{pkg}\t{secs}s" if passed else
                f"--- FAIL: Test{func[:1].upper()}{func[1:]} (0.00s)\n{cr.error.splitlines()[0]} [recovered]\n"
                f"\t{path}:{line} +0x1f4\nFAIL\t{pkg}\t{secs}s")
    elif proj.lang == "python":  # --count comes from the pytest-repeat plugin
        cmd = f"{prompt} pytest -q -k {test} --count={runs}\n"
        body = (f"{runs} passed in {secs}s" if passed else
                f"{path}:{line}: {cr.error.splitlines()[0]}\n1 failed, {runs - 1} passed in {secs}s")
    else:
        cmd = f"{prompt} npx jest {basename(path).split('.')[0]}\n"
        body = (f"Tests:       {runs} passed, {runs} total\nTime:        {secs} s" if passed else
                f"  ● {func} › handles long input\n    {cr.error}\n      at {func} ({path}:{line}:19)\n"
                f"Tests:       1 failed, {runs - 1} passed, {runs} total\nTime:        {secs} s")
    capture = head + cmd + body
    verdict = f"all {runs} runs pass" if passed else f"1 of {runs} runs still fails at {ref}"
    gist = (f"Fix {h} verified: {test} passes {runs}/{runs} runs" if passed else
            f"Fix {h} incomplete: {test} still fails at {ref}")
    if len(gist) > 80:  # long Go test names: the test is in the summary, the gist keeps the reference
        gist = f"Fix {h} verified: passes {runs}/{runs} runs" if passed else f"Fix {h} incomplete: fails at {ref}"
    truth = encoding_truth(
        gist,
        f"After fix {h} (#{issue}) for {cr.concept} in {func}, {verdict}.",
        [f"{first} re-ran the tests for {func} ({runs} runs, {secs}s) to check the fix.",
         "The fix holds." if passed else f"The {cr.concept} is still reachable, so #{issue} is not done."],
        [proj.name, cr.concept, "verification", "test"],
        topics=[("testing", "engineering/testing")],
        entities=[(first, "person", "verified the fix"), (h, "commit", f"fix for #{issue}"),
                  (func, "function", "under test")],
        actions=[("re-ran", f"tests for {func}", f"{runs} runs")],
        causality=[] if passed else [("still_fails", f"{cr.error.splitlines()[0]} at {ref}")],
        significance="routine" if passed else "important", tone="satisfying" if passed else "frustrating",
        outcome="success" if passed else "failure", salience=0.45 if passed else 0.75)
    must = [first, h, str(runs), secs] if passed else [first, h, ref, str(runs - 1) if proj.lang != "go" else secs]
    return Event("verify", capture, truth["summary"], must, [first], truth, topic=f"the fix {h}")


GENERATORS = {"crash": crash, "commit": commit, "chat": chat, "review": review, "bench": bench}
