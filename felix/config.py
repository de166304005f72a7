"""Typed run configuration (model, train, quail, data): YAML files validated by pydantic, with `section.key=value`
overrides (read through `felix.yaml_config`)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from felix.errors import FelixError
from felix.yaml_config import StrictModel, apply_overrides, format_validation_error, read_yaml_mapping


class _Strict(StrictModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)


class ModelConfig(_Strict):
    """Shape of a FelixLM: a Llama-style decoder with SpliceCore surfaces on some MLPs."""

    vocab_size: int = 32768
    n_layers: int = 24
    d_model: int = 1024
    n_heads: int = 16
    n_kv_heads: int | None = None  # None: multi-head attention; fewer: grouped-query
    d_ff: int = 4096
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    splice_every: int = 4  # SpliceCore on layers k-1, 2k-1, ...; 0 disables it
    splice_rank: int = 8
    init_std: float = 0.02

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim d_model/n_heads = {self.d_model // self.n_heads} must be even for RoPE")
        if self.n_kv_heads is not None and self.n_kv_heads <= 0:  # `or` in kv_heads would read 0 as n_heads
            raise ValueError(f"n_kv_heads must be positive (omit it for multi-head attention), got {self.n_kv_heads}")
        kv = self.kv_heads
        if self.n_heads % kv:
            raise ValueError(f"n_kv_heads ({kv}) must divide n_heads ({self.n_heads})")
        if self.splice_every < 0 or self.splice_rank < 0:
            raise ValueError("splice_every and splice_rank must be >= 0")
        # 0 or below (or NaN) gives NaN logits from the first step (rope, norms) or fails torch's normal_ (init)
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be positive and finite, got {getattr(self, name)}")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def splice_layers(self) -> list[int]:
        """Indices of the layers that carry a SpliceCore."""
        if not self.splice_every or not self.splice_rank:
            return []
        k = self.splice_every
        return [i for i in range(self.n_layers) if i % k == k - 1]


class TrainConfig(_Strict):
    """Optimizer, schedule, batch and runtime switches for `felix train`."""

    seq_len: int = 2048
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.0  # lr at the end of the decay, as a fraction of lr
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # WSD: decay over the last fraction of steps
    decay_shape: Literal["linear", "sqrt", "cosine", "exp"] = "sqrt"
    decay_start_step: int | None = None  # branch the decay from a stable-phase step instead
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    activation_checkpointing: bool = False
    compile: bool = False
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    seed: int = 1337
    log_every: int = 1
    eval_every: int = 100
    # val windows (seq_len tokens each) that every evaluation reads, over all ranks together: the same set whatever
    # micro_batch_size and world size, so val loss stays comparable across a resume that changes them. Unset, it
    # is eval_batches x micro_batch_size, resolved once here, so the run's config.yaml and checkpoints pin it.
    eval_sequences: int | None = None
    eval_batches: int = 8  # sizes eval_sequences when that is unset (the older setting)
    ckpt_every: int = 200
    # also checkpoint once this many minutes of wall time have passed since the last checkpoint (or the start)
    ckpt_every_minutes: float | None = None
    keep_last: int = 3
    # also keep for good the checkpoint at each multiple of this step (milestones to branch a decay from); 0: none
    keep_every: int = 0
    spike_factor: float = 2.0  # a loss above factor x its running mean is a spike; 0 disables
    max_bad_steps: int = 3  # consecutive skipped steps before rolling back to a checkpoint
    max_rollbacks: int = 3  # rollbacks in one divergence episode (until healthy again) before the run stops
    # good steps in a row that make a run healthy again after a bad step or rollback: a due checkpoint waits for
    # them, and a new checkpoint becomes the rollback target once this many good steps followed it
    healthy_steps: int = 20
    threads: int | None = None  # torch CPU threads; None (or 0) leaves torch's default
    # MFU's denominator, one device's FLOP/s; None: the datasheet bf16 peak of a known GPU, else measured
    # (a CPU's matmul peak takes seconds per start; a GPU the table lacks has no MFU without it)
    peak_flops: float | None = None

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        for name in ("seq_len", "micro_batch_size", "grad_accum_steps", "max_steps", "keep_last", "log_every",
                     "ckpt_every", "eval_batches", "max_bad_steps", "healthy_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "seed", "max_rollbacks", "keep_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_sequences is not None and self.eval_sequences <= 0:
            raise ValueError(f"eval_sequences must be positive (or null for eval_batches x micro_batch_size), "
                             f"got {self.eval_sequences}")
        if self.eval_sequences is None:  # not by assignment: validate_assignment would run this validator again
            self.__dict__["eval_sequences"] = self.eval_batches * self.micro_batch_size
        if self.threads is not None and self.threads < 0:
            raise ValueError(f"threads must be >= 1 (or 0/null for torch's default), got {self.threads}")
        # `not x > 0` rather than `x <= 0`: NaN fails every comparison and must be refused too
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if not self.grad_clip > 0:  # clip_grad_norm_ with 0 zeroes every gradient; .inf means no clipping
            raise ValueError(f"grad_clip must be > 0 (.inf for no clipping), got {self.grad_clip}")
        if self.ckpt_every_minutes is not None and not (math.isfinite(self.ckpt_every_minutes)
                                                        and self.ckpt_every_minutes > 0):
            raise ValueError(f"ckpt_every_minutes must be positive and finite (or null for none), "
                             f"got {self.ckpt_every_minutes}")
        if self.peak_flops is not None and not (math.isfinite(self.peak_flops) and self.peak_flops > 0):
            raise ValueError(f"peak_flops must be positive and finite (FLOP/s), got {self.peak_flops}")
        if not 0 < self.eps < math.inf:
            raise ValueError(f"eps must be positive and finite, got {self.eps}")
        if not 0.0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be >= 0 and finite, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (self.spike_factor == 0 or self.spike_factor > 1):  # a factor <= 1 flags ordinary steps
            raise ValueError(f"spike_factor must be 0 (off) or > 1, got {self.spike_factor}")
        start = self.decay_start_step
        if start is not None and not self.warmup_steps <= start < self.max_steps:
            raise ValueError(f"decay_start_step ({start}) must be in [warmup_steps, max_steps) = "
                             f"[{self.warmup_steps}, {self.max_steps})")
        return self


class QuailConfig(_Strict):
    """QUAIL margin loss (felix.quail): keep whitelisted tokens' logit lead above quantization noise."""

    enabled: bool = False
    tokens: list[str] = []  # each must be exactly one token of the run's tokenizer
    # Defaults are QUAIL v2, the variant EXP-40b confirmed (docs/experiments/EXP-40b-quail-v2.md); v1 was
    # gamma 1, normalize whitelisted, protect_only false, calibration logit_noise (EXP-40: it collapsed
    # into whitelisting every position).
    gamma: float = 5.0  # weight of the hinge term
    margin: float | None = None  # fixed margin; None calibrates it from measured quantization noise
    format: Literal["rq4", "rq3", "nf4", "q8_0", "q4_0"] = "rq4"  # the deployment format whose noise counts
    percentile: float = 99.0  # of the measured noise at whitelisted positions
    calibrate_every: int = 200  # steps between recalibrations; 0 calibrates once, at the start
    # val windows (seq_len tokens each) that every calibration measures, the first of the val split, each rank all of
    # them: the same sample whatever train.micro_batch_size and world size, as train.eval_sequences for val loss.
    # Unset, it is calibration_batches x train.micro_batch_size, resolved once by FelixConfig, so the run's
    # config.yaml and checkpoints pin it.
    calibration_sequences: int | None = None
    calibration_batches: int = 2  # sizes calibration_sequences when that is unset (the older setting)
    ste: bool = False  # hinge on the fake-quantized forward (straight-through) instead of the full one
    # Divide the hinge by all target positions (a whitelisted position weighs like gamma tokens) or by the
    # whitelisted ones of the step, over its micro-batches and ranks (a step's few whitelisted positions weigh
    # as much as all its tokens).
    normalize: Literal["whitelisted", "all"] = "all"
    protect_only: bool = True  # hinge only where the target already leads: protect a margin, never create one
    calibration: Literal["logit_noise", "margin_shift"] = "margin_shift"  # see felix.quail

    @model_validator(mode="after")
    def _check(self) -> QuailConfig:
        if self.enabled and not self.tokens:
            raise ValueError("quail.enabled needs quail.tokens (the whitelisted token strings)")
        if not 0 <= self.gamma < math.inf or (self.margin is not None and not 0 <= self.margin < math.inf):
            raise ValueError(f"quail.gamma and quail.margin must be finite and >= 0, got {self.gamma}, {self.margin}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"quail.percentile must be in (0, 100], got {self.percentile}")
        if self.calibration_batches < 1 or self.calibrate_every < 0:
            raise ValueError("quail.calibration_batches must be >= 1 and quail.calibrate_every >= 0")
        if self.calibration_sequences is not None and self.calibration_sequences < 1:
            raise ValueError(f"quail.calibration_sequences must be positive (or null for calibration_batches x "
                             f"train.micro_batch_size), got {self.calibration_sequences}")
        return self


class DataConfig(_Strict):
    """Where the tokens come from: a tokenizer and a data mix (see `felix.datamix`)."""

    tokenizer: str | None = None
    mix: str | None = None
    verify_checksums: bool = True


class FelixConfig(_Strict):
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    quail: QuailConfig = QuailConfig()

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, raw: Any) -> Any:
        """A section with every key commented out is null in YAML: it means the section's defaults."""
        if isinstance(raw, dict):
            return {k: v for k, v in raw.items() if not (k in cls.model_fields and v is None)}
        return raw

    @model_validator(mode="after")
    def _check(self) -> FelixConfig:
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"
            )
        if self.quail.calibration_sequences is None:
            # a copy, not the given QuailConfig changed in place: another FelixConfig given the same object would
            # take this one's micro-batch; set in __dict__, so no validator runs again (as eval_sequences)
            sequences = self.quail.calibration_batches * self.train.micro_batch_size
            self.__dict__["quail"] = self.quail.model_copy(update={"calibration_sequences": sequences})
        return self


# the TrainConfig fields that set the learning rate at each step
SCHEDULE_FIELDS = ("lr", "min_lr_ratio", "max_steps", "warmup_steps", "decay_fraction", "decay_shape",
                   "decay_start_step")


def changed_fields(old: BaseModel, new: BaseModel, fields: tuple[str, ...] | None = None) -> str:
    """The fields (all, or `fields`) whose value `new` changes, as `name old -> new`; empty when none."""
    theirs, ours = old.model_dump(), new.model_dump()
    return ", ".join(f"{k} {theirs.get(k)} -> {v}" for k, v in ours.items()
                     if (fields is None or k in fields) and theirs.get(k) != v)



CONFIG_DIR = Path(__file__).parent / "configs"


def resolve_config_path(name: str | Path) -> Path:
    """A config file path, or the name of a packaged config (`felix-300m`, `demo`, ...)."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = CONFIG_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if packaged.is_file() and len(path.parts) <= 2:
        return packaged
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise FelixError(f"config file not found: {name} (packaged configs: {known})")



def load_config(path: str | Path | None, overrides: list[str] | None = None) -> FelixConfig:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate."""
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        path = resolve_config_path(path)
        source = str(path)
        raw = read_yaml_mapping(path, "sections model, train, data")
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, source, overrides)


def config_from_dict(raw: dict, source: str = "<dict>", overrides: list[str] | None = None) -> FelixConfig:
    """Validate `raw`; errors name `source`, or the one of `overrides` that set the key at fault."""
    try:
        return FelixConfig.model_validate(raw)
    except ValidationError as exc:
        raise FelixError("invalid config\n" + format_validation_error(exc, source, FelixConfig, overrides)) from None


# the config's path-valued fields, by section; a config file's are read against the working directory
PATH_FIELDS = {"data": ("tokenizer", "mix")}


def absolute_paths(cfg: FelixConfig) -> FelixConfig:
    """`cfg` with its path fields made absolute against the working directory: what a run records (OUT/config.yaml,
    checkpoints), so a resume or a later reader started in another directory finds the same files."""
    sections = {}
    for section, fields in PATH_FIELDS.items():
        part = getattr(cfg, section)
        update = {f: os.path.abspath(v) for f in fields if (v := getattr(part, f))}
        sections[section] = part.model_copy(update=update)
    return cfg.model_copy(update=sections)


def dump_config(cfg: FelixConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
