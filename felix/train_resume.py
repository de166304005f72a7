"""What a training run takes back from a checkpoint: its whole training state (--resume, --init-from), its
weights alone (--init-weights-only), or, after repeated bad steps, the last good one's weights and optimizer (a
rollback). A damaged checkpoint is set aside for the one before it."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from felix import checkpoint as ckpt_io
from felix.config import SCHEDULE_FIELDS, FelixConfig, TrainConfig, changed_fields
from felix.dataloader import MixLoader
from felix.distributed import DistInfo, gather_ints
from felix.errors import FelixError
from felix.model import FelixLM
from felix.tokenizer import FelixTokenizer
from felix.train_ckpt import rollback_candidates
from felix.train_quail import complete_margin_source
from felix.train_state import TrainState


def check_tokenizer(path: Path, tokenizer: FelixTokenizer, dist: DistInfo, weights_only: bool = False,
                    allow_new: bool = False, stacklevel: int = 6) -> None:
    """Refuse checkpoint `path` when its copy of the tokenizer makes other token ids than this run's: the
    weights learned what each id meant there. Compared by content (`vocab_digest`), not bytes, so a tokenizer.json
    saved again with other whitespace is the same one. `allow_new` (weights only) lets it through."""
    saved = path / ckpt_io.TOKENIZER_FILE
    if not saved.is_file():  # checkpoints written without one (save_checkpoint's tokenizer_path is optional)
        if dist.is_main:
            warnings.warn(f"{path}: no {ckpt_io.TOKENIZER_FILE} in the checkpoint, so no check that it was trained "
                          f"with this run's tokenizer {tokenizer.path}", stacklevel=stacklevel)  # Trainer()'s caller
        return
    if not (diff := FelixTokenizer.load(saved).difference(tokenizer)) or allow_new:
        return
    if weights_only:
        way = ("pass --allow-new-tokenizer to start from its weights all the same (its embeddings and output "
               "layer were learned for the other ids)")
    else:
        way = "use --init-weights-only --allow-new-tokenizer to start a new run from its weights alone"
    raise FelixError(f"{saved}: the checkpoint was trained with another tokenizer than this run's data.tokenizer "
                     f"{tokenizer.path} ({diff}); a run continued from it needs the tokenizer it was trained with "
                     f"(and shards made with it), or {way}")


def restore_training(path: Path, cfg: FelixConfig, model: FelixLM, optimizer: torch.optim.Optimizer,
                     loader: MixLoader, scaler: torch.amp.GradScaler | None, dist: DistInfo,
                     device: torch.device, tokenizer: FelixTokenizer) -> TrainState:
    """Checkpoint `path`'s weights, optimizer, data position and loss scale into this run's; returns its
    TrainState. The checkpoint must be of the same model config and tokenizer, and its data position fit this
    run's data."""
    ckpt = ckpt_io.load_checkpoint(path, map_location=device)
    check_tokenizer(ckpt.path, tokenizer, dist)
    if changed := changed_fields(ckpt.config.model, cfg.model):
        raise FelixError(f"{path}: checkpoint model config differs from this run's ({changed}); "
                         f"--init-weights-only takes its weights alone where their shapes agree")
    ckpt_io.load_model_weights(model, ckpt)
    ckpt_io.restore_training_state(ckpt.path, model, optimizer)
    try:
        state = TrainState(**ckpt.trainer_state)
    except TypeError as exc:
        raise FelixError(f"{path}: trainer state in trainer.json does not fit this felix ({exc})") from None
    try:
        if state.step > 0 and not state.train_loader:  # would silently re-read from sample 0
            raise FelixError(f"trainer.json has no data position for step {state.step}")
        # every rank restores its loader, and would each say the same (the loader's changed-data warnings)
        with nullcontext() if dist.is_main else warnings.catch_warnings(action="ignore"):
            loader.load_state_dict(state.train_loader)
    except FelixError as exc:
        # the checkpoint's data position only fits the same seq_len, seed and mix sources
        raise FelixError(f"{path}: {exc}; a run continued from this checkpoint needs the seq_len, seed and "
                         f"data mix it was trained with (--init-weights-only starts afresh from its "
                         f"weights)") from None
    if scaler is not None and state.grad_scaler:
        scaler.load_state_dict(state.grad_scaler)
    # legitimate (extending a WSD run, branching a decay), but silent it would hide a typo in a resume
    if (changed := changed_fields(ckpt.config.train, cfg.train, SCHEDULE_FIELDS)) and dist.is_main:
        warnings.warn(f"{path}: this run's schedule differs from the checkpoint's ({changed}); the lr follows "
                      f"this run's from step {state.step}", stacklevel=5)  # Trainer()'s caller
    if dist.is_main:
        notes = batch_changes(ckpt.config.train, cfg.train, state.world_size, dist.world_size)
        if cfg.train.eval_every and state.train_loader and loader.reweighted_since(state.train_loader):
            # the val stream draws its windows by the mix's weights too: the same weights score differently
            notes.append(f"the data mix's weights changed, and evaluations draw their {cfg.train.eval_sequences} val "
                         f"windows by them: val loss from step {state.step} on is measured on another val set, not "
                         f"comparable with the earlier evaluations")
        for note in notes:
            warnings.warn(f"{path}: {note}", stacklevel=5)
    complete_margin_source(state, ckpt.config.quail, state.world_size or dist.world_size)
    state.world_size = dist.world_size
    return state


def _batch(tc: TrainConfig, ranks: int | None) -> str:
    """A step's tokens as `N (micro-batch x accumulation x ranks x seq_len)`; `ranks` None: unknown."""
    per_rank = tc.micro_batch_size * tc.grad_accum_steps * tc.seq_len
    total = f"{per_rank * ranks:,}" if ranks else f"{per_rank:,} per rank"
    return (f"{total} ({tc.micro_batch_size} micro-batch x {tc.grad_accum_steps} accumulation x "
            f"{ranks or '?'} rank{'s' * (ranks != 1)} x {tc.seq_len} seq_len)")


def batch_changes(old: TrainConfig, new: TrainConfig, old_ranks: int | None, new_ranks: int) -> list[str]:
    """What a continued run changes of the checkpoint's optimizer step and val set, each a sentence saying how to
    keep it; `old_ranks` None: a checkpoint that does not record its world size (its ranks are taken as these)."""
    notes = []
    ranks = old_ranks or new_ranks
    old_tokens = old.micro_batch_size * old.grad_accum_steps * ranks * old.seq_len
    new_tokens = new.micro_batch_size * new.grad_accum_steps * new_ranks * new.seq_len
    if old_tokens != new_tokens:
        per_accum = new.micro_batch_size * new_ranks * new.seq_len
        keep = (f"train.grad_accum_steps={old_tokens // per_accum} keeps it" if old_tokens % per_accum == 0 else
                f"no train.grad_accum_steps keeps it with micro-batch {new.micro_batch_size} on {new_ranks} "
                f"rank{'s' * (new_ranks != 1)}")
        notes.append(f"tokens per optimizer step change from {_batch(old, old_ranks)} to {_batch(new, new_ranks)}: "
                     f"the lr and schedule were set for the checkpoint's batch; {keep}")
    if old.eval_sequences != new.eval_sequences:
        notes.append(f"evaluations read {new.eval_sequences} val windows, the checkpoint's run "
                     f"{old.eval_sequences}: val loss is not comparable with its earlier evaluations; "
                     f"train.eval_sequences={old.eval_sequences} keeps it")
    return notes


def load_weights(path: Path, cfg: FelixConfig, model: FelixLM, dist: DistInfo, device: torch.device,
                 tokenizer: FelixTokenizer, allow_new_tokenizer: bool = False) -> None:
    """The weights of `path` as step 0: the optimizer, schedule, RNG and data stream start fresh. The
    model config may differ where the weights' shapes do not (rope_theta, max_seq_len); the tokenizer only
    with `allow_new_tokenizer`."""
    ckpt = ckpt_io.load_checkpoint(path, map_location=device)  # an artifact is refused by name
    check_tokenizer(ckpt.path, tokenizer, dist, weights_only=True, allow_new=allow_new_tokenizer, stacklevel=5)
    ckpt_io.load_model_weights(model, ckpt)
    if (changed := changed_fields(ckpt.config.model, cfg.model)) and dist.is_main:
        warnings.warn(f"--init-from {path}: model config differs ({changed})", stacklevel=4)  # Trainer()'s caller


def set_aside_damaged(damaged: list[tuple[Path, FelixError]], used: Path, dist: DistInfo) -> list[str]:
    """Rename the checkpoints in `damaged` (newer than `used`, the one that read back) `step-N.corrupt` (rank 0
    alone), so neither keep_last nor a later resume reads them again; what to tell the user, one line each."""
    lines = []
    for path, exc in damaged:
        aside = ckpt_io.set_aside_corrupt(path) if dist.is_main else path
        lines.append(f"{exc}: checkpoint {path.name} is damaged; renamed it {aside.name} (delete it once looked "
                     f"at) and went on from {used.name}, {ckpt_io.step_of(path) - ckpt_io.step_of(used)} steps "
                     f"earlier")
    return lines


def check_same_step(step: int, out_dir: Path, dist: DistInfo, device: torch.device, what: str) -> None:
    """Under torchrun: a FelixError on every rank unless all took a checkpoint of the same `step` (0: none). A rank
    that sees another --out (a disk of its node's own) would otherwise train on from step 0 or another checkpoint:
    DDP makes its weights rank 0's, but not its optimizer, lr or data position, and no error comes until the end."""
    steps = [s for s, in gather_ints([step], dist, device)]
    if len(set(steps)) == 1:
        return
    by_step: dict[int, list[int]] = {}
    for rank, s in enumerate(steps):
        by_step.setdefault(s, []).append(rank)
    seen = "; ".join(f"step {s}: rank{'s' * (len(r) > 1)} {', '.join(map(str, r[:8]))}"
                     f"{f' and {len(r) - 8} more' if len(r) > 8 else ''}" for s, r in sorted(by_step.items()))
    raise FelixError(f"{out_dir}: the ranks {what} different steps ({seen}): every rank reads the run's checkpoints "
                     f"from --out, so on several nodes it must be one directory they all share (a shared file "
                     f"system), not a disk of each node's own")


def resumed(state: TrainState) -> list[int]:
    """After a resume from `state`'s checkpoint: the unproven checkpoints (`train_ckpt.confirm`). One saved while
    the run was healthy becomes the rollback target, so a rollback never deletes it; one saved at a halt or the
    run's end while it was not stays unproven, and the target is the one before it (`state.good_checkpoint`)."""
    if state.saved_healthy:
        state.good_checkpoint = state.step
        return []
    return [state.step]


def roll_back(out_dir: Path, state: TrainState, max_rollbacks: int, model: FelixLM, optimizer: torch.optim.Optimizer,
              device: torch.device, reason: str, dist: DistInfo, unproven: Sequence[int] = ()
              ) -> tuple[Path, list[str]]:
    """Restore weights and optimizer from the last checkpoint known good (`train_ckpt.rollback_candidates`); the
    data stream moves on. Checkpoints written since, not yet proven by healthy training, are deleted, but for those
    with splice patches beside them (`checkpoint.holds_patches`, kept with a warning line); a damaged one is set aside
    for the one before it. Gives up after `max_rollbacks` rollbacks in one divergence episode.
    Returns the checkpoint and lines to report (what was deleted or set aside)."""
    candidates = rollback_candidates(out_dir, state, unproven)
    if not candidates:
        raise FelixError(f"{state.bad_steps} bad steps in a row and no checkpoint to roll back to "
                         f"(last: {reason})")
    if state.rollback_tries >= max_rollbacks:
        raise FelixError(
            f"step {state.step}: training keeps failing after {state.rollback_tries} rollback(s) to {candidates[0]} "
            f"(last: {reason}); stopping. Lower train.lr, check the data, or raise train.max_rollbacks")
    damaged: list[tuple[Path, FelixError]] = []
    for path in candidates:
        try:
            ckpt = ckpt_io.load_checkpoint(path, map_location=device)
            ckpt_io.load_model_weights(model, ckpt)
            ckpt_io.restore_training_state(ckpt.path, model, optimizer)
            break
        except ckpt_io.CorruptCheckpoint as exc:
            damaged.append((path, exc))
    else:  # none reads back: a cause common to all (permissions) is no damage of theirs, so none is set aside
        raise damaged[0][1]
    # before rank 0 sets aside or deletes any: a rank still listing them would find another target
    check_same_step(ckpt_io.step_of(path), out_dir, dist, device, "rolled back to")
    lines = set_aside_damaged(damaged, path, dist)
    if dist.is_main:
        for newer in ckpt_io.list_checkpoints(out_dir):
            if ckpt_io.step_of(newer) <= ckpt_io.step_of(path):
                continue
            if ckpt_io.holds_patches(newer):  # as pruning spares it: deleted, its edits would go with it
                lines.append(f"kept {newer.name}, written after {path.name} and not followed by healthy training, "
                             f"because it holds splice patches (`felix splice list --checkpoint {newer}`); the run "
                             f"goes on from {path.name}, but a --resume before its next checkpoint would take "
                             f"{newer.name}. Roll its patches back, or delete it, to let it go")
                continue
            ckpt_io.remove_checkpoint(newer)
            lines.append(f"deleted {newer.name}: written after {path.name}, it was not followed by healthy "
                         f"training")
    if state.good_checkpoint is not None and ckpt_io.step_of(path) <= state.good_checkpoint:
        state.good_checkpoint = ckpt_io.step_of(path)  # the target itself was damaged: the one before it
    state.rollbacks += 1
    state.rollback_tries += 1
    state.bad_steps = 0
    state.last_bad_step = state.step
    state.loss_ema = ckpt.trainer_state.get("loss_ema")
    return path, lines
