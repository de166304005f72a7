"""`MixLoader`: a deterministic, resumable, rank-aware stream of training windows drawn from a data mix.

The stream is defined globally: global sample g comes from the source that lags its target share
the most (so actual ratios track the weights within one sample; when a resumed run's mix has new
weights, the shares count from the sample where they took effect), and a source's k-th sample is
window perm_e[k mod n] of its token stream, where perm_e is a seeded permutation for epoch
e = k div n. The loader's whole position is therefore the per-source sample counts, which is what
checkpoints store. At global step s with global batch G = batch_size × world_size, rank r takes
samples [s·G + r·batch_size, s·G + (r+1)·batch_size), so any world size sees the same global batches.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from felix.datamix import DataMix
from felix.errors import FelixError
from felix.shards import ShardSet, check_token_ids


def window_ids(n: int) -> np.ndarray:
    """0..n-1 in the narrowest of int32/int64 that holds them: shuffled in place by `Generator.permutation`, they
    give the same order as `permutation(n)` (int64) at half the memory (59 MB a source of 15M windows)."""
    return np.arange(n, dtype=np.int32 if n <= np.iinfo(np.int32).max else np.int64)


class _SourceStream:
    """Windows of seq_len+1 tokens (overlapping by one, so every token is a target once) over one
    source's split, addressed across shard-file boundaries."""

    def __init__(self, name: str, index: int, shards: ShardSet, split: str, seq_len: int, seed: int):
        self.name, self.seq_len = name, seq_len
        self.arrays, self.files = shards.arrays(split), shards.files(split)
        # ids at or past the tokenizer's vocabulary (a damaged shard read without checksums) would index past
        # the embedding: a bare IndexError, on a GPU a device assert. None: an index without vocab_size.
        vocab, dtype = shards.meta.get("vocab_size"), np.dtype(shards.meta["dtype"])
        self.vocab = vocab if isinstance(vocab, int) and vocab <= np.iinfo(dtype).max else None
        self.signed = dtype.kind == "i"
        sizes = np.array([len(a) for a in self.arrays], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        total = int(self.starts[-1])
        self.n_windows = (total - 1) // seq_len if total > seq_len else 0
        if self.n_windows == 0:
            raise FelixError(f"source {name!r} ({shards.root}): its {split} split has {total} tokens, fewer than "
                             f"one window of seq_len+1 = {seq_len + 1}")
        self._seed = (seed, index)
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def window(self, k: int, check: bool = False) -> np.ndarray:
        """The k-th sample this source yields; `check`: FelixError naming the shard file if it holds an id
        outside the vocabulary."""
        epoch, pos = divmod(k, self.n_windows)
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([*self._seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(window_ids(self.n_windows)), epoch
        start = int(self._perm[pos]) * self.seq_len
        return self._read(start, self.seq_len + 1, check)

    def _read(self, start: int, length: int, check: bool) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        filled = 0
        f = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < length:
            offset = start + filled - int(self.starts[f])
            piece = self.arrays[f][offset: offset + length - filled]
            if check and self.vocab is not None:
                check_token_ids(piece, self.vocab, self.files[f], offset,
                                "its index.json: a damaged shard (`felix data verify` checks its checksums)")
            out[filled: filled + len(piece)] = piece
            filled += len(piece)
            f += 1
        return out


class MixLoader:
    """Batches of (x, y) windows from `split` of every mix source; see the module docstring for the stream.

    `verify` checks shard checksums when the loader opens the shards itself; pass already-opened
    `shards` (DataMix.open_shards) to share one verified set between the train and val loaders.
    `skip_short` drops sources whose split is shorter than one window (listed in `skipped`) instead of
    failing: for validation, where a source's held-out split may be a handful of documents.
    """

    def __init__(self, mix: DataMix, split: str, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, verify: bool = True, shards: dict[str, ShardSet] | None = None,
                 skip_short: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1 (got {seq_len}, {batch_size})")
        shards = shards if shards is not None else mix.open_shards(verify=verify)
        self.sources, self.skipped = [], []
        for i, s in enumerate(mix.sources):
            try:
                self.sources.append(_SourceStream(s.name, i, shards[s.name], split, seq_len, seed))
            except FelixError:
                # A validation split can be a few documents; evaluation then covers the other sources.
                if not skip_short:
                    raise
                self.skipped.append(s.name)
        if not self.sources:
            raise FelixError(f"no source of the mix has one window of {seq_len + 1} tokens in its {split} split")
        self.names = [src.name for src in self.sources]
        targets = mix.targets()
        self.skipped_shares = {n: targets[n] for n in self.skipped}  # of the whole mix
        total = sum(targets[n] for n in self.names)
        self.weights = [targets[n] / total for n in self.names]
        # ids are checked once per batch, against the smallest vocabulary (a check per window, on memmap slices,
        # costs several times more); a batch past it is read again window by window to name the shard file
        vocabs = [src.vocab for src in self.sources if src.vocab is not None]
        self._vocab, self._signed = min(vocabs, default=None), any(src.signed for src in self.sources)
        self.split, self.seq_len, self.batch_size, self.seed = split, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.counts = [0] * len(self.sources)  # samples drawn per source, over all ranks
        self.sample = 0  # global samples drawn so far (all ranks)
        # where the current weights took effect (a resumed run whose mix was reweighted): shares count from here
        self.base_counts, self.base_sample = [0] * len(self.sources), 0

    def skipped_note(self) -> str | None:
        """Which sources `skip_short` left out, with their shares of the mix; None when it left out none."""
        if not self.skipped:
            return None
        names = ", ".join(f"{n!r} ({w:.0%} of the mix)" for n, w in self.skipped_shares.items())
        return (f"sources whose {self.split} split is shorter than one window of seq_len+1 = {self.seq_len + 1} "
                f"tokens: {names}; their {self.split} batches leave them out and draw from the other "
                f"{1 - sum(self.skipped_shares.values()):.0%} of the mix ({', '.join(self.names)})")

    def _next_source(self) -> int:
        """Draw the next global sample's source: the one furthest below its target share (ties: the earlier
        source). Pure-Python floats: this runs once per sample, and small-list math beats numpy here."""
        m, best, best_lag = self.sample + 1 - self.base_sample, 0, -math.inf
        for i, (w, c, b) in enumerate(zip(self.weights, self.counts, self.base_counts, strict=True)):
            lag = w * m - (c - b)
            if lag > best_lag:
                best, best_lag = i, lag
        self.counts[best] += 1
        self.sample += 1
        return best

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, seq_len) int64; advances the global stream by one step
        (batch_size × world_size samples, of which this rank reads its own slice)."""
        first = self.rank * self.batch_size
        rows, drawn = [], []
        for j in range(self.batch_size * self.world_size):
            s = self._next_source()
            if first <= j < first + self.batch_size:
                rows.append(self.sources[s].window(self.counts[s] - 1))
                drawn.append((s, self.counts[s] - 1))
        stacked = np.stack(rows)
        if self._vocab is not None and (stacked.max() >= self._vocab or self._signed and stacked.min() < 0):
            for s, k in drawn:
                self.sources[s].window(k, check=True)
        batch = torch.from_numpy(stacked)
        return batch[:, :-1], batch[:, 1:]

    def advance(self, samples: int) -> None:
        """Move the global stream forward without reading any data (audits, fast-forwarding)."""
        for _ in range(samples):
            self._next_source()

    # -- position ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The loader's position: global sample index and samples drawn per source (JSON-serialisable), with
        what the stream's order depends on besides (seq_len, seed, the sources' order in the mix) and the
        weights it was drawn under since `base`."""
        return {"sample": int(self.sample), "counts": dict(zip(self.names, map(int, self.counts), strict=True)),
                "seq_len": self.seq_len, "seed": self.seed, "sources": list(self.names),
                "weights": dict(zip(self.names, self.weights, strict=True)),
                "windows": {src.name: src.n_windows for src in self.sources},
                "base": {"sample": self.base_sample,
                         "counts": dict(zip(self.names, map(int, self.base_counts), strict=True))}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()` position (an empty dict means the start)."""
        if not isinstance(state, dict):
            raise FelixError(f"loader state is malformed (want an object, got {type(state).__name__})")
        if not state:
            return
        counts = self._saved_counts(state)
        if self._weights_changed(state):
            # Counted from the start, a source the new weights favour would be drawn alone for as long as it
            # takes to catch up (and a disfavoured one not at all): the new shares start here instead.
            base_counts, base_sample = list(counts), int(state["sample"])
        else:
            base_counts, base_sample = self._saved_base(state, counts)
        windows = state.get("windows") if isinstance(state.get("windows"), dict) else {}
        if changed := {src.name: (windows[src.name], src.n_windows) for src in self.sources
                       if windows.get(src.name, src.n_windows) != src.n_windows}:
            # the epoch's permutation is of the new window count: the saved count points into another order
            warnings.warn(f"the shards of {sorted(changed)} changed since this position was saved (windows "
                          f"then -> now: {changed}); the current epoch of each continues in another order, "
                          f"so some of its windows may repeat and others be skipped", stacklevel=2)
        self.counts, self.sample = counts, int(state["sample"])
        self.base_counts, self.base_sample = base_counts, base_sample

    def _saved_counts(self, state: dict) -> list[int]:
        """The per-source counts of a saved position, checked to be of this stream (seq_len, seed, sources)."""
        if not isinstance(state.get("counts"), dict) or not isinstance(state.get("sample"), int):
            raise FelixError(f"loader state is malformed (want 'sample' and per-source 'counts'): {state}")
        if sorted(state["counts"]) != sorted(self.names):
            raise FelixError(f"loader state names sources {sorted(state['counts'])}, "
                             f"but the mix has {sorted(self.names)}")
        if state.get("seq_len", self.seq_len) != self.seq_len:
            raise FelixError(f"loader state is for seq_len {state['seq_len']}, this run uses {self.seq_len}")
        # Older states lack these two. Either one changed reshuffles every source's current epoch, so the
        # counts would point into other permutations: windows repeated and others skipped, silently.
        if state.get("seed", self.seed) != self.seed:
            raise FelixError(f"loader state is for seed {state['seed']}, this run uses {self.seed} (train.seed)")
        if state.get("sources", self.names) != self.names:
            raise FelixError(f"loader state has the sources in the order {state['sources']}, the mix has "
                             f"{self.names} (a source's shuffle depends on its place in the mix)")
        counts = [state["counts"][n] for n in self.names]
        if not all(_is_int(c) for c in counts):
            raise FelixError(f"loader state is malformed (per-source counts must be integers): {state['counts']}")
        if sum(counts) != int(state["sample"]) or min(counts) < 0:
            raise FelixError(f"loader state is inconsistent: per-source counts {state['counts']} do not add up to "
                             f"sample {state['sample']}")
        return counts

    def reweighted_since(self, state: dict) -> bool:
        """Whether the saved position `state` was drawn under other weights than this loader's; older states lack
        them and count as drawn under these."""
        saved = state.get("weights")
        if saved is None:
            return False
        if not isinstance(saved, dict) or sorted(saved) != sorted(self.names) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) for w in saved.values()):
            raise FelixError(f"loader state is malformed ('weights' must map each source to a number): {saved}")
        return not all(math.isclose(saved[n], w, rel_tol=1e-9) for n, w in zip(self.names, self.weights, strict=True))

    def _weights_changed(self, state: dict) -> bool:
        """`reweighted_since`, and a warning saying so."""
        if not self.reweighted_since(state):
            return False
        saved = state["weights"]
        old = {n: round(saved[n], 4) for n in self.names}
        new = dict(zip(self.names, (round(w, 4) for w in self.weights), strict=True))
        warnings.warn(f"the data mix's weights changed since this position was saved ({old} -> {new}); they "
                      f"apply from sample {state['sample']} on, and each source continues its shuffle where it was",
                      stacklevel=3)  # the caller of load_state_dict
        return True

    def _saved_base(self, state: dict, counts: list[int]) -> tuple[list[int], int]:
        """Where the saved weights took effect; the start for states written before it was stored."""
        base = state.get("base")
        if base is None:
            return [0] * len(self.names), 0
        ok = isinstance(base, dict) and isinstance(base.get("counts"), dict) and sorted(base["counts"]) == sorted(
            self.names) and isinstance(base.get("sample"), int)
        b = [base["counts"][n] for n in self.names] if ok else []
        if not ok or not all(_is_int(c) and 0 <= c <= k
                             for c, k in zip(b, counts, strict=True)) or sum(b) != base["sample"]:
            raise FelixError(f"loader state is malformed ('base' must be a position at or before this one): {base}")
        return b, base["sample"]

    def tokens_by_source(self) -> dict[str, int]:
        """Target tokens drawn so far per source, over all ranks."""
        return {n: int(c) * self.seq_len for n, c in zip(self.names, self.counts, strict=True)}

    def epochs_by_source(self) -> dict[str, float]:
        """Passes over each source's windows so far (1.5 = halfway through the second epoch)."""
        return {src.name: int(c) / src.n_windows for src, c in zip(self.sources, self.counts, strict=True)}


def _is_int(x: object) -> bool:
    """An integer of a JSON document (JSON's true and false load as bools, which are ints to Python)."""
    return isinstance(x, int) and not isinstance(x, bool)
