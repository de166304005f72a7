"""What a training run reads: the tokenizer, the data mix with its shards (verified once), and loaders over
them; problems found at start, before step 1, not hours in at the first evaluation."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from felix.config import FelixConfig
from felix.dataloader import MixLoader
from felix.datamix import DataMix
from felix.distributed import DistInfo, gather_objects
from felix.errors import FelixError
from felix.shards import ShardSet
from felix.tokenizer import FelixTokenizer, vocab_falls_short

# what may differ between the nodes of one run: where each finds its copy of the data, and its CPU threads
PER_NODE_FIELDS = ("data.tokenizer", "data.mix", "train.threads")


@dataclass
class TrainData:
    tokenizer: FelixTokenizer
    mix: DataMix
    shards: dict[str, ShardSet]  # by source name, shared by every loader
    token_bytes: torch.Tensor  # UTF-8 bytes per token id, for bits per byte

    @classmethod
    def open(cls, cfg: FelixConfig, dist: DistInfo | None = None) -> TrainData:
        """The config's tokenizer and mix, checked against the model and each other. Under torchrun (`dist`)
        rank 0 alone says what is allowed but likely a mistake, and the ranks on a node hash the shards' checksums
        between them: every rank hashing every file read the data once per rank."""
        dist = dist or DistInfo()
        warn = dist.is_main
        if not cfg.data.tokenizer or not cfg.data.mix:
            raise FelixError("config: data.tokenizer and data.mix must both be set to train")
        tokenizer = FelixTokenizer.load(cfg.data.tokenizer)
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise FelixError(f"config: model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                             f"({tokenizer.vocab_size}, {cfg.data.tokenizer})")
        if warn and vocab_falls_short(tokenizer.vocab_size, cfg.model.vocab_size):
            warnings.warn(f"config: model.vocab_size ({cfg.model.vocab_size:,}) is far larger than the tokenizer's "
                          f"({tokenizer.vocab_size:,}, {cfg.data.tokenizer}): the embedding rows of the "
                          f"{cfg.model.vocab_size - tokenizer.vocab_size:,} ids no text has never train; size the "
                          f"model to the tokenizer", stacklevel=3)
        mix = DataMix.load(cfg.data.mix)
        mix.validate_against(tokenizer)
        try:
            shards = mix.open_shards(verify=cfg.data.verify_checksums, share=(dist.local_rank, dist.local_world_size))
            problem = None
        except FelixError as exc:
            if not dist.enabled:
                raise
            problem = str(exc)
        # a corrupted shard is found by the one rank that hashed it: every rank must stop, naming it, before the
        # first collective, which the others would wait in for ever
        if found := [p for p in gather_objects(problem, dist) if p is not None]:
            raise FelixError(found[0])
        token_bytes = torch.from_numpy(tokenizer.token_byte_lengths().astype(np.int64))
        return cls(tokenizer, mix, shards, token_bytes)

    def loader(self, cfg: FelixConfig, split: str, dist: DistInfo) -> MixLoader:
        """This rank's loader over `split`; a val source shorter than one window is skipped, a train one fails."""
        tc = cfg.train
        return MixLoader(self.mix, split, tc.seq_len, tc.micro_batch_size, tc.seed, rank=dist.rank,
                         world_size=dist.world_size, shards=self.shards, skip_short=split == "val")

    def val_stream(self, cfg: FelixConfig) -> MixLoader:
        """The val split as one stream of single windows, the same on every rank (`train_eval.evaluate_val`)."""
        tc = cfg.train
        return MixLoader(self.mix, "val", tc.seq_len, 1, tc.seed, shards=self.shards, skip_short=True)

    def check_ranks_agree(self, cfg: FelixConfig, dist: DistInfo, loader: MixLoader) -> None:
        """Under torchrun: a FelixError on every rank unless all run one config (`PER_NODE_FIELDS` aside) over
        sources of as many windows. Nodes started with configs of their own that differ would otherwise train on
        silently (another seed or micro-batch: windows read twice or skipped; another lr: each rank's own
        optimizer step on the shared gradient) or fail later with no word of why (another max_steps or model).
        `loader` is this rank's train loader, fresh."""
        if not dist.enabled:
            return
        mine = {f"{section}.{key}": value for section, fields in cfg.model_dump(mode="json").items()
                for key, value in fields.items() if f"{section}.{key}" not in PER_NODE_FIELDS}
        stream = loader.state_dict()  # what the order of the windows depends on
        mine["the mix's sources"] = stream["sources"]
        mine |= {f"source {name!r}": f"weight {stream['weights'][name]:.6g}, {stream['windows'][name]} train windows"
                 for name in stream["sources"]}
        ranks = gather_objects(mine, dist)
        first, diffs = ranks[0], []
        for rank, theirs in enumerate(ranks[1:], start=1):
            if keys := [k for k in sorted(first.keys() | theirs.keys()) if first.get(k) != theirs.get(k)]:
                diffs.append(f"rank {rank}: " + ", ".join(f"{k} {first.get(k)!r} -> {theirs.get(k)!r}" for k in keys))
        if diffs:
            shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more ranks" if len(diffs) > 4 else "")
            raise FelixError(f"the ranks were started with different configs or data (rank 0's -> theirs: {shown}); "
                             f"every rank must run the same config over the same data (only the paths data.tokenizer "
                             f"and data.mix, and train.threads, may differ between nodes)")

    def check_val(self, cfg: FelixConfig, dist: DistInfo) -> None:
        """When the run will read the val split (evaluations, QUAIL's margin calibration): that it has a window,
        and warnings naming the sources too short to count and those an evaluation reads over and over."""
        tc, quail = cfg.train, cfg.quail
        if not (tc.eval_every or (quail.enabled and quail.margin is None)):
            return
        try:
            skipped = self.loader(cfg, "val", dist).skipped_note()
        except FelixError as exc:
            why = f"train.eval_every={tc.eval_every} evaluates on" if tc.eval_every else "QUAIL calibrates on"
            raise FelixError(f"{cfg.data.mix}: {why} the val split, but {exc}; lower train.seq_len or hold out "
                             f"more data") from None
        if skipped and dist.is_main:
            warnings.warn(f"{cfg.data.mix}: {skipped}", stacklevel=4)
        if tc.eval_every and dist.is_main and (repeats := self.val_repeats(cfg)):
            warnings.warn(f"{cfg.data.mix}: each evaluation reads train.eval_sequences={tc.eval_sequences} val "
                          f"windows, over twice what some sources hold out ({repeats}): their windows count several "
                          f"times over; hold out more of them (`felix data shard --min-val-tokens`) or lower "
                          f"train.eval_sequences", stacklevel=4)

    def val_repeats(self, cfg: FelixConfig) -> str:
        """The sources an evaluation reads each val window of more than twice on average, as `name (N windows, read M
        times)`; empty when none. The val stream cycles a source past its end without a word otherwise (a little
        past it, as the demo's small tasks source, is no waste worth a warning)."""
        stream = self.val_stream(cfg)
        stream.advance(cfg.train.eval_sequences or cfg.train.eval_batches * cfg.train.micro_batch_size)
        return ", ".join(f"{src.name} ({src.n_windows} windows, read {n} times)"
                         for src, n in zip(stream.sources, stream.counts, strict=True) if n > 2 * src.n_windows)

    def sample_targets(self, cfg: FelixConfig, windows: int) -> torch.Tensor:
        """The target ids of the first `windows` training windows, from a loader of their own (the run's is
        untouched)."""
        tc = cfg.train
        stream = MixLoader(self.mix, "train", tc.seq_len, 1, tc.seed, shards=self.shards)
        return torch.cat([stream.next_batch()[1] for _ in range(windows)])
