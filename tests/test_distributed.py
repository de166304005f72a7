"""torchrun integration (felix.distributed) where it needs no second process."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from felix.distributed import init_distributed
from felix.errors import FelixError


def test_a_local_rank_past_the_visible_gpus_is_named_before_cuda_is_touched(monkeypatch):
    # torchrun --nproc-per-node above the GPU count: set_device failed with CUDA's bare "invalid device ordinal"
    for name, value in {"RANK": "64", "WORLD_SIZE": "65", "LOCAL_RANK": "64"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(FelixError, match=r"LOCAL_RANK 64, but this node has \d+ GPU\(s\) visible.*--nproc-per-node"):
        init_distributed("cuda")
    assert not dist.is_initialized()
