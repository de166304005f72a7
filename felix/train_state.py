"""What a training run carries from step to step besides tensors (saved in every checkpoint), and what it
reports when it ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    tokens: int = 0
    loss_ema: float | None = None
    bad_steps: int = 0
    skipped_steps: int = 0
    rollbacks: int = 0
    # Health (train.healthy_steps): the last bad step or rollback (None: none yet), the rollbacks of the divergence
    # episode under way (reset once healthy), and the newest checkpoint training went on from healthily, the
    # rollback target (None: none confirmed yet in this run directory)
    last_bad_step: int | None = None
    rollback_tries: int = 0
    good_checkpoint: int | None = None
    # Whether the run was healthy when this checkpoint was saved (not at a halt or the run's end mid-divergence): a
    # resume takes one that was as the rollback target (felix.train_resume.resumed). True for older checkpoints:
    # nearly all were written healthy, and one taken as unproven could be deleted by a rollback.
    saved_healthy: bool = True
    quail_margin: float | None = None
    # What quail_margin came from (felix.train_quail.margin_source): a resume under other QUAIL settings must not
    # train on with it. None: not recorded (a checkpoint from before it was, or no margin yet).
    quail_margin_source: dict | None = None
    train_loader: dict = field(default_factory=dict)
    grad_scaler: dict | None = None  # fp16 loss scale and growth tracker (torch.amp.GradScaler.state_dict)
    world_size: int | None = None  # the ranks that trained it (None: a checkpoint from before it was recorded)


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    tokens: int
    final_loss: float | None  # None when unknown (no step logged) or non-finite
    val_loss: float | None
    val_bpb: float | None
    tok_per_s: float  # over the optimizer steps' time: evaluation and checkpoint writes are not training
    mfu: float | None
    params: int
    seconds: float
    skipped_steps: int
    flops_per_token: int
    peak_flops: float | None  # one device's; MFU is against world_size of them
    world_size: int
    interrupted: int | None = None  # the signal (SIGINT, SIGTERM) that stopped the run before max_steps
    max_steps: int = 0  # train.max_steps
    trained_steps: int = 0  # the steps this call took: 0 for a finished run resumed
