"""Device and precision selection (felix.device) for GPUs this machine does not have: the CUDA device's
description (its compute capability, ROCm or not) is what is set, pick_dtype itself runs as it does on one."""

from types import SimpleNamespace

import pytest
import torch

from felix.device import pick_dtype


def _visible_gpu(monkeypatch, major: int, hip: str | None) -> None:
    """torch.cuda as it reads on a machine with one GPU of compute capability `major`.x (ROCm when `hip`), on
    which a bf16 tensor can be made: so it can on a T4 or V100, where bf16 arithmetic is emulated."""
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(major=major, minor=0, name=f"sm_{major}0 card"))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)


@pytest.mark.parametrize(("major", "hip", "expected"), [
    (7, None, torch.float32),  # T4 / V100: bf16 only emulated; auto must not pick it
    (8, None, torch.bfloat16),  # A100, RTX 30xx and later
    (9, None, torch.bfloat16),  # H100
    (11, "6.2", torch.bfloat16),  # ROCm (the capability torch reports there is the gfx major)
])
def test_auto_dtype_is_bf16_only_on_gpus_with_bf16_tensor_cores(monkeypatch, major, hip, expected):
    _visible_gpu(monkeypatch, major, hip)
    assert pick_dtype("auto", torch.device("cuda")) == expected


def test_an_explicit_dtype_is_taken_as_asked(monkeypatch):
    _visible_gpu(monkeypatch, 7, None)
    assert pick_dtype("bf16", torch.device("cuda")) == torch.bfloat16  # asked for: emulated or not
    assert pick_dtype("fp16", torch.device("cuda")) == torch.float16
