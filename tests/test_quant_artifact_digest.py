"""A quantized artifact records a contents digest per tensor: damage that decodes to finite weights is refused by
name at load, and an artifact written before digests loads as it always did."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from test_quant_model import CONFIG, tiny_model

from felix.config import config_from_dict
from felix.errors import FelixError
from felix.quant_artifact import MANIFEST, WEIGHTS, load_quant_checkpoint, write_artifact
from felix.quantize import pack_state, size_report

Q_PROJ = "layers.0.attn.q_proj.weight"


@pytest.fixture
def artifact(tmp_path) -> Path:
    cfg = config_from_dict(CONFIG)
    packed = pack_state(tiny_model().state_dict(), "rq4")
    return write_artifact(tmp_path / "art", packed, cfg, size_report(packed, cfg.model, "rq4"))


def _flip_code_bit(artifact: Path, name: str) -> None:
    """Flip one bit of a 4-bit code in `name`'s first rq4 block (past its fp16 scale): the weights stay finite."""
    blob = bytearray((artifact / WEIGHTS).read_bytes())
    (header_len,) = struct.unpack("<Q", blob[:8])
    start = json.loads(blob[8:8 + header_len])[name]["data_offsets"][0]
    blob[8 + header_len + start + 5] ^= 0x10
    (artifact / WEIGHTS).write_bytes(bytes(blob))


def test_a_flipped_bit_in_a_packed_tensor_is_refused_naming_the_file_and_tensor(artifact):
    """It loaded: one weight of the model silently changed, finite, so nothing else noticed."""
    entries = json.loads((artifact / MANIFEST).read_text())["tensors"]
    assert all(isinstance(e.get("blake2b"), str) for e in entries.values())
    _flip_code_bit(artifact, Q_PROJ)
    with pytest.raises(FelixError, match=rf"art/{WEIGHTS}: tensor {Q_PROJ}: contents do not match .*{MANIFEST}"):
        load_quant_checkpoint(artifact)


def test_an_artifact_written_before_digests_loads_as_before(artifact):
    want = load_quant_checkpoint(artifact).model_state
    manifest = json.loads((artifact / MANIFEST).read_text())
    for entry in manifest["tensors"].values():
        del entry["blake2b"]
    (artifact / MANIFEST).write_text(json.dumps(manifest))
    got = load_quant_checkpoint(artifact).model_state
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
