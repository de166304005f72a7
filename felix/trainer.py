"""The training loop: WSD-scheduled AdamW over a data mix, with exact resume, bad-step protection,
periodic validation and atomic checkpoints (written once healthy: felix.train_ckpt). Runs single-process or under
torchrun (DDP)."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError

from felix import checkpoint as ckpt_io
from felix.atomic import atomic_write_text
from felix.config import FelixConfig, absolute_paths, config_from_dict, dump_config
from felix.dataloader import MixLoader
from felix.device import pick_device, pick_dtype, synchronize
from felix.distributed import DistInfo, all_reduce_mean, barrier, frees_gradients, init_distributed, shutdown, wrap_ddp
from felix.errors import FelixError
from felix.flops import flops_per_token, mfu, peak_flops
from felix.metrics import MetricsLog, Progress, read_metrics
from felix.model import FelixLM
from felix.objective import TrainingObjective
from felix.optim import build_optimizer
from felix.run_lock import lock_run_dir
from felix.schedule import wsd_schedule
from felix.train_ckpt import checkpoint_note, confirm, healthy, last_good, protected, space_warning, write_failure
from felix.train_control import StepControl
from felix.train_data import TrainData
from felix.train_eval import evaluate_val
from felix.train_quail import TrainQuail, reconcile_margin
from felix.train_resume import (
    check_same_step,
    load_weights,
    restore_training,
    resumed,
    roll_back,
    set_aside_damaged,
)
from felix.train_state import TrainResult, TrainState
from felix.train_step import accumulate_gradients, skip_reason, whitelisted_share


def _finite(x: float | None) -> float | None:
    """`x`, or None for a missing or non-finite value (JSON has no NaN)."""
    return x if x is not None and math.isfinite(x) else None


class Trainer:
    def __init__(self, cfg: FelixConfig, out_dir: Path, resume: bool = False,
                 init_from: Path | None = None, progress: bool = True, init_weights_only: bool = False,
                 allow_new_tokenizer: bool = False):
        """`init_from` starts from another run's checkpoint: its whole training state (step, optimizer, data
        position), or with `init_weights_only` its weights alone, as step 0 of a fresh run. A checkpoint trained
        with another tokenizer is refused, for weights alone too unless `allow_new_tokenizer`."""
        # the run records absolute data paths (config.yaml, checkpoints): a resume may start in another directory
        self.cfg, self.out_dir, self.show_progress = absolute_paths(cfg), Path(out_dir), progress
        tc = cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.device = pick_device(tc.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        # One process per run directory, locked before anything in it is touched and held until close(). Rank 0
        # alone writes there (checkpoints, metrics, config.yaml), so only rank 0 locks.
        self._run_lock = lock_run_dir(self.out_dir) if self.dist.is_main else None
        try:
            self._setup(resume, init_from, init_weights_only, allow_new_tokenizer)
        except BaseException:
            self._release_lock()
            raise

    def _setup(self, resume: bool, init_from: Path | None, init_weights_only: bool, allow_new_tokenizer: bool) -> None:
        """__init__'s work once the run directory is locked."""
        cfg, tc = self.cfg, self.cfg.train
        if self.dist.is_main:  # before the latest is chosen: a kill mid-overwrite left a checkpoint moved aside
            ckpt_io.remove_partial_checkpoints(self.out_dir)
        barrier(self.dist)
        existing = ckpt_io.latest_checkpoint(self.out_dir)
        if existing is not None and not resume:
            # A fresh run here would interleave its checkpoints with the old run's, and pruning by step
            # number would delete the new ones.
            raise FelixError(f"{self.out_dir}: already holds checkpoints of a run (latest {existing.name}); "
                             f"pass --resume to continue it, or choose a new --out")
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.dtype = pick_dtype(tc.dtype, self.device)
        # fp16 gradients underflow without loss scaling; bf16 and fp32 have fp32's exponent range
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        torch.manual_seed(tc.seed)

        self.data = TrainData.open(cfg, self.dist)
        self.tokenizer = self.data.tokenizer

        self.model = FelixLM(cfg.model).to(self.device)
        self.model.activation_checkpointing = tc.activation_checkpointing
        self.params = self.model.num_params()
        self.optimizer = build_optimizer(self.model, tc)
        self.loader = self._loader("train")
        self.data.check_ranks_agree(cfg, self.dist, self.loader)  # before any collective the config orders
        self.data.check_val(cfg, self.dist)  # now, not at the first evaluation
        self.state = TrainState(world_size=self.dist.world_size)
        self._save_pending = False  # a due checkpoint put off until the run is healthy again
        self.overflow = False  # the last step was skipped for an fp16 overflow (the loss scale backs off)
        self._unproven: list[int] = []  # steps of the checkpoints in out_dir newer than the rollback target
        # metrics.jsonl in out_dir is this run's up to its step only when resuming there (or once run() has
        # started it): an --init-from run starts at step N with none of its rows here
        self._continues_log = resume and existing is not None

        self.out_dir.mkdir(parents=True, exist_ok=True)
        resume_from = existing if resume else None
        if resume and resume_from is None and self.dist.is_main:
            start = ("from scratch" if init_from is None else f"from the weights of --init-from {init_from}"
                     if init_weights_only else f"from --init-from {init_from}")
            warnings.warn(f"--resume: no checkpoint in {self.out_dir} yet; starting {start}", stacklevel=3)
        damaged: list[tuple[Path, FelixError]] = []
        if resume_from is not None:
            # The newest checkpoint that reads back; a damaged one (a disk error, a truncated file) is set aside with
            # a warning: an unattended run restarted by its scheduler loses ckpt_every steps instead of stopping
            # until someone looks. (Inline, not a helper: restore_training's warnings name Trainer()'s caller.)
            for resume_from in reversed(ckpt_io.list_checkpoints(self.out_dir)):
                try:
                    self._restore(resume_from)
                    break
                except ckpt_io.CorruptCheckpoint as exc:
                    damaged.append((resume_from, exc))
            else:  # none reads back: a cause common to all (permissions) is no damage of theirs; none is set aside
                raise damaged[0][1]
            self._unproven = resumed(self.state)
        elif init_from is not None and init_weights_only:
            load_weights(ckpt_io.resolve_checkpoint(init_from), cfg, self.model, self.dist, self.device,
                         self.tokenizer, allow_new_tokenizer)
        elif init_from is not None:
            path = ckpt_io.resolve_checkpoint(init_from)
            self._restore(path)
            self.state.good_checkpoint = None  # another run directory's
            self.state.rollback_tries = 0
            if self.state.step >= tc.max_steps:  # the run would train nothing and write no checkpoint
                raise FelixError(f"--init-from {path}: the checkpoint is at step {self.state.step}, and "
                                 f"train.max_steps is {tc.max_steps}: nothing to train; pass "
                                 f"train.max_steps=<more than {self.state.step}> to train on from it, or "
                                 f"--init-weights-only to start a run of its own from its weights")
        # every rank took the same checkpoint (a node-local --out would hide it from some), checked before rank 0
        # sets aside a damaged one that another rank may still be listing
        check_same_step(self.state.step, self.out_dir, self.dist, self.device, "started at")
        for line in set_aside_damaged(damaged, resume_from, self.dist):
            if self.dist.is_main:
                warnings.warn(f"--resume: {line}", stacklevel=3)

        if tc.warmup_steps >= tc.max_steps and tc.decay_fraction > 0 and self.dist.is_main:
            warnings.warn(f"train.warmup_steps ({tc.warmup_steps}) >= train.max_steps ({tc.max_steps}): the run "
                          "ends inside the warmup and its lr never decays", stacklevel=3)
        mc = cfg.model
        if mc.splice_every and mc.splice_rank and not mc.splice_layers and self.dist.is_main:  # 0: none on purpose
            warnings.warn(f"config: model.n_layers ({mc.n_layers}) is below model.splice_every ({mc.splice_every}): "
                          f"the model has no SpliceCore layer (the first is layer splice_every - 1); lower "
                          f"model.splice_every, or set it to 0 to train without SpliceCore", stacklevel=3)
        self.quail: TrainQuail | None = None
        self.whitelist = None
        if cfg.quail.enabled:
            self.quail = TrainQuail(cfg, self.data, self.dist, self.device)
            self.whitelist = self.quail.whitelist
            # a restored margin from other quail settings is replaced (fixed) or recalibrated at once
            if (note := reconcile_margin(self.state, cfg.quail)) and self.dist.is_main:
                warnings.warn(note, stacklevel=3)
        else:  # a margin from before a stretch without QUAIL measured other weights: a later QUAIL run calibrates anew
            self.state.quail_margin = self.state.quail_margin_source = None
        self.objective = TrainingObjective(self.model, cfg.quail, self.whitelist)
        self.fwd_model = self.objective
        if tc.compile:
            self.fwd_model = torch.compile(self.objective)
        if self.dist.enabled:
            self.fwd_model = wrap_ddp(self.fwd_model, self.dist, self.device)

        self.flops_per_token = flops_per_token(self.model, tc.seq_len)
        self.peak, self.peak_source = ((tc.peak_flops, "train.peak_flops") if tc.peak_flops
                                       else peak_flops(self.device, self.dtype))
        self.ckpt_bytes = ckpt_io.checkpoint_bytes(self.model, self.optimizer, self.tokenizer.path)
        if self.dist.is_main:
            atomic_write_text(self.out_dir / "config.yaml", dump_config(cfg))
            if (low := space_warning(self.out_dir, tc, self.ckpt_bytes, self.state.step)) is not None:
                warnings.warn(low, stacklevel=3)
        self._control = StepControl(tc.ckpt_every_minutes, self.dist, self.device)  # its clock runs from the start

    # -- setup helpers ------------------------------------------------------------------------
    def _loader(self, split: str) -> MixLoader:
        return self.data.loader(self.cfg, split, self.dist)

    def _restore(self, path: Path) -> None:
        self.state = restore_training(path, self.cfg, self.model, self.optimizer, self.loader, self.scaler,
                                      self.dist, self.device, self.tokenizer)

    def _checkpoint(self, progress: Progress, applied: bool, reason: str, last_step: bool, halt: int) -> None:
        """A checkpoint is due: write it once the run is healthy (`train_ckpt`); at the run's end or on a stop
        signal the weights as they are if finite (a skipped step left them as they were), and the last good
        checkpoint stays the rollback target. Non-finite weights at a stop are not saved (`stop_message` says so)."""
        ok = healthy(self.state, self.cfg.train)
        if (applied or halt) and (ok or last_step or halt) and self._weights_finite():
            if not ok:
                progress.write(checkpoint_note(self.state, last_good(self.out_dir, self.state, self._unproven)))
            self._save(ends=last_step or bool(halt))
        elif last_step:
            self._final_save(progress, reason)

    def _final_save(self, progress: Progress, reason: str) -> None:
        """The last step was bad: keep finite final weights (the step changed nothing), refuse others."""
        if not self._weights_finite():
            raise FelixError(f"step {self.state.step}: the run ended with non-finite weights; not checkpointing "
                             f"them (latest good checkpoint: {last_good(self.out_dir, self.state, self._unproven)})")
        progress.write(f"warning: final step {self.state.step} was skipped ({reason}); saving its weights anyway")
        self._save(ends=True)

    def _save(self, ends: bool = False) -> None:
        """Write a checkpoint and prune (`protected`: at a save that `ends` the run, the rollback target alone)."""
        self.state.saved_healthy = healthy(self.state, self.cfg.train)
        self.state.train_loader = self.loader.state_dict()
        self.state.grad_scaler = self.scaler.state_dict() if self.scaler is not None else None
        if self.dist.is_main:
            tc, good = self.cfg.train, last_good(self.out_dir, self.state, self._unproven)
            try:
                ckpt_io.save_checkpoint(self.out_dir, self.state.step, self.model, self.cfg, asdict(self.state),
                                        self.optimizer, keep_last=tc.keep_last, tokenizer_path=self.tokenizer.path,
                                        keep_every=tc.keep_every,
                                        protect=protected(self.state, () if ends else self._unproven))
            # a full disk; safetensors reports its failed write as its own error. atomic_dir removed the partial one.
            except (OSError, SafetensorError) as exc:
                target = ckpt_io.step_dir(self.out_dir, self.state.step)
                raise write_failure(exc, target, self.ckpt_bytes, tc, good) from None
        barrier(self.dist)
        self._control.reset()
        self._save_pending = False
        # Those rank 0 pruned leave the list (after the barrier: every rank reads the same run directory, as a
        # rollback does), so `confirm` never makes a deleted checkpoint the target.
        on_disk = {ckpt_io.step_of(p) for p in ckpt_io.list_checkpoints(self.out_dir)}
        self._unproven = [s for s in self._unproven if s in on_disk and s != self.state.step] + [self.state.step]

    def _count_step(self, applied: bool, reason: str, progress: Progress) -> None:
        """A skipped step counts (as bad unless an fp16 overflow); a good one ends the streak and may prove a
        checkpoint (`_confirm`)."""
        if applied:
            self.state.bad_steps = 0
            self._confirm()
            return
        self.state.skipped_steps += 1
        if self.overflow:
            progress.write(f"step {self.state.step} skipped: {reason}; loss scale now {self.scaler.get_scale():g}")
        else:
            self.state.bad_steps += 1
            self.state.last_bad_step = self.state.step
            progress.write(f"warning: step {self.state.step} skipped: {reason}")

    def _confirm(self) -> None:
        """After a good step: the newest checkpoint becomes the rollback target once healthy training followed it,
        and the one it replaces is no longer spared from pruning."""
        if confirm(self.state, self.cfg.train, self._unproven) and self.dist.is_main:
            tc = self.cfg.train
            ckpt_io.prune_checkpoints(self.out_dir, tc.keep_last, tc.keep_every, protected(self.state, self._unproven))

    def _weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def _rollback(self, progress: Progress, reason: str) -> None:
        """Back to the last good checkpoint's weights and optimizer after repeated bad steps (`roll_back`)."""
        last, lines = roll_back(self.out_dir, self.state, self.cfg.train.max_rollbacks, self.model, self.optimizer,
                                self.device, reason, self.dist, self._unproven)
        self._unproven = [] if ckpt_io.step_of(last) == self.state.good_checkpoint else [ckpt_io.step_of(last)]
        for line in lines:
            progress.write(f"warning: {line}")
        progress.write(f"warning: rolled back weights to {last.name} after repeated bad steps "
                       f"({self.state.rollback_tries} of at most {self.cfg.train.max_rollbacks} in a row)")

    def set_max_steps(self, max_steps: int) -> None:
        """Change the run's length while it is still warming up, where the schedule so far does not depend
        on it (the demo fits its run to a time budget); config.yaml and later checkpoints record it."""
        tc = self.cfg.train
        if tc.decay_start_step is not None or not self.state.step < min(tc.warmup_steps, max_steps):
            raise FelixError(f"train.max_steps can change only during the warmup (step {self.state.step} of "
                             f"{tc.warmup_steps}), without decay_start_step, and to more steps than were taken")
        raw = self.cfg.model_dump(mode="json")
        raw["train"]["max_steps"] = max_steps
        self.cfg = config_from_dict(raw, "train.max_steps")
        if self.dist.is_main:
            atomic_write_text(self.out_dir / "config.yaml", dump_config(self.cfg))

    # -- one optimizer step -------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        tc = self.cfg.train
        return tc.lr * wsd_schedule(step, tc.max_steps, tc.warmup_steps, tc.decay_fraction, tc.decay_shape,
                                    tc.min_lr_ratio, tc.decay_start_step)

    def train_step(self) -> tuple[float, float, bool, str]:
        """Forward/backward over the accumulation window; apply the update unless the step is bad.
        Returns (loss, grad_norm, applied, reason); the loss is the cross-entropy alone."""
        tc, q = self.cfg.train, self.cfg.quail
        if self.quail is not None:
            self.quail.calibrate_if_due(self.state, self.model)
        margin = self.state.quail_margin or 0.0
        lr = self.lr_at(self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.fwd_model.train()
        batches = [self.loader.next_batch() for _ in range(tc.grad_accum_steps)]
        whitelisted = (whitelisted_share(batches, self.whitelist, self.dist, self.device)
                       if q.enabled and q.normalize == "whitelisted" else None)
        loss_sum, hinge_sum, positions = accumulate_gradients(self.fwd_model, batches, margin, whitelisted,
                                                              self.scaler, self.dist, self.device, self.dtype)
        loss = all_reduce_mean(loss_sum / tc.grad_accum_steps, self.dist).item()
        if self.quail is not None:
            self.quail.record(hinge_sum / tc.grad_accum_steps, positions, margin)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip and judge the true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip).item()

        reason, self.overflow = skip_reason(loss, grad_norm, self.state, tc, q, self.scaler, self.model)
        if reason:
            if self.scaler is not None:
                self.scaler.update()  # backs off after an overflow; unscale_ needs an update before the next
            self.optimizer.zero_grad(set_to_none=frees_gradients(self.dist))
            return loss, grad_norm, False, reason
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=frees_gradients(self.dist))
        ema = self.state.loss_ema
        self.state.loss_ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        return loss, grad_norm, True, ""

    def evaluate(self) -> tuple[float, float]:
        """Validation loss (nats/token) and bits per byte over train.eval_sequences val windows (train_eval)."""
        tc = self.cfg.train
        return evaluate_val(self.model, self.data.val_stream(self.cfg), self.data.token_bytes, tc.eval_sequences,
                            tc.micro_batch_size, self.device, self.dtype, self.dist)

    def _mfu(self, tok_per_s: float) -> float | None:
        """MFU of all ranks' tok/s, so against all ranks' devices (one device's peak overstates it world_size x)."""
        return mfu(tok_per_s, self.flops_per_token, self.peak and self.peak * self.dist.world_size)

    # -- the loop ------------------------------------------------------------------------------
    def run(self, until: int | None = None) -> TrainResult:
        """Train up to `until` steps (default train.max_steps); call again to continue in-process. A SIGINT or
        SIGTERM ends it after the current step, checkpointed (`interrupted`); a trainer so stopped stays stopped."""
        tc = self.cfg.train
        stop = min(until or tc.max_steps, tc.max_steps)
        # Rows past the current step are dropped: a resumed run recomputes exactly those steps.
        metrics = MetricsLog(self.out_dir / "metrics.jsonl",
                             resume_step=self.state.step if self._continues_log else None,
                             tensorboard_dir=self.out_dir / "tb") if self.dist.is_main else None
        self._continues_log = True
        start_step = self.state.step
        tokens_per_step = tc.micro_batch_size * tc.seq_len * tc.grad_accum_steps * self.dist.world_size
        progress = Progress(tc.max_steps, self.state.step, enabled=self.show_progress, is_main=self.dist.is_main,
                            every=tc.log_every)
        t_start = time.perf_counter()
        loss = val_loss = val_bpb = float("nan")
        window_tok, window_s = 0, 0.0
        self._control.signals.install()
        try:
            while self.state.step < stop and not self._control.stopped_by:
                t0 = time.perf_counter()
                loss, grad_norm, applied, reason = self.train_step()
                synchronize(self.device)
                dt = time.perf_counter() - t0
                self.state.step += 1
                self.state.tokens += tokens_per_step
                window_tok += tokens_per_step
                window_s += dt
                self._count_step(applied, reason, progress)
                tok_per_s = tokens_per_step / dt
                step_mfu = self._mfu(tok_per_s)
                row = {"step": self.state.step, "loss": loss, "lr": self.lr_at(self.state.step - 1),
                       "tokens": self.state.tokens, "grad_norm": grad_norm, "tok_per_s": tok_per_s,
                       "mfu": step_mfu, "dt": dt}
                if self.quail is not None:
                    row |= self.quail.row
                    self.quail.check_fires(progress, self.state.step - start_step, self.state.step == stop)
                if self.scaler is not None:
                    row["loss_scale"] = self.scaler.get_scale()
                if not applied:
                    row["skipped"] = reason
                if self.state.bad_steps >= tc.max_bad_steps:
                    try:
                        self._rollback(progress, reason)
                    except Exception:  # the run stops at this step: its row (and why) is logged first
                        if metrics is not None:
                            metrics.log(row)
                        raise
                last_step = self.state.step == tc.max_steps
                if tc.eval_every and (self.state.step % tc.eval_every == 0 or last_step):
                    val_loss, val_bpb = self.evaluate()
                    row |= {"val_loss": val_loss, "val_bpb": val_bpb}
                    progress.write(f"step {self.state.step}: val loss {val_loss:.4f}, {val_bpb:.4f} bits/byte")
                # the last step always (a log_every past max_steps would leave the run without a row), and every
                # skipped one: its reason is what a user reads the log for
                if metrics is not None and (self.state.step % tc.log_every == 0 or "val_loss" in row or last_step
                                            or not applied):
                    metrics.log(row)
                progress.update(loss, tok_per_s, step_mfu, row["lr"], grad_norm)
                halt, timed = self._control.decide()  # every rank at every step: one all_reduce under torchrun
                step = self.state.step
                # a milestone (keep_every) is due like a scheduled one; one put off stays due until written
                if step % tc.ckpt_every == 0 or (tc.keep_every and step % tc.keep_every == 0) or timed:
                    self._save_pending = True
                if self._save_pending or last_step or halt:
                    self._checkpoint(progress, applied, reason, last_step, halt)
        finally:
            self._control.signals.restore()
            progress.close()
            if metrics is not None:
                metrics.close()
        seconds = time.perf_counter() - t_start
        if window_tok == 0:  # nothing left to train (a finished run resumed): report what the run logged
            rows = read_metrics(self.out_dir / "metrics.jsonl")
            vals = [r for r in rows if r.get("val_loss") is not None]
            loss = rows[-1].get("loss") if rows else None
            val_loss, val_bpb = (vals[-1]["val_loss"], vals[-1].get("val_bpb")) if vals else (None, None)
        avg_tok_s = window_tok / max(window_s, 1e-9)
        return TrainResult(
            out_dir=self.out_dir, steps=self.state.step, tokens=self.state.tokens, final_loss=_finite(loss),
            val_loss=_finite(val_loss), val_bpb=_finite(val_bpb),
            tok_per_s=avg_tok_s, mfu=self._mfu(avg_tok_s),
            params=self.params, seconds=seconds, skipped_steps=self.state.skipped_steps,
            flops_per_token=self.flops_per_token, peak_flops=self.peak, world_size=self.dist.world_size,
            interrupted=(self._control.stopped_by or None) if self.state.step < tc.max_steps else None,
            max_steps=tc.max_steps, trained_steps=self.state.step - start_step,
        )

    def _release_lock(self) -> None:
        if self._run_lock is not None:
            self._run_lock.release()

    def close(self) -> None:
        """Let go of the run directory's lock and leave the process group (under torchrun)."""
        self._release_lock()
        shutdown(self.dist)
