"""A tiny trained FelixLM for the splice tests, and counterfactual edits of what it predicts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from felix.checkpoint import latest_checkpoint
from felix.config import ModelConfig, load_config
from felix.model import FelixLM
from felix.splice_examples import Example
from felix.trainer import Trainer

TINY = {
    "model": {"vocab_size": 512, "n_layers": 4, "d_model": 64, "n_heads": 4, "d_ff": 128, "max_seq_len": 64,
              "splice_every": 2, "splice_rank": 4},
    "train": {"seq_len": 32, "micro_batch_size": 8, "max_steps": 40, "lr": 3e-3, "warmup_steps": 2,
              "decay_fraction": 0.3, "eval_every": 40, "eval_batches": 1, "ckpt_every": 40, "keep_last": 1,
              "dtype": "fp32", "threads": 1, "log_every": 10},
}


def train_tiny(tmp: Path, tiny_mix, splice_rank: int = 4) -> Path:
    raw = {**TINY, "data": {"tokenizer": str(tiny_mix.tokenizer_path), "mix": str(tiny_mix.mix_path)}}
    raw["model"] = {**TINY["model"], "splice_rank": splice_rank}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(raw))
    Trainer(load_config(tmp / "cfg.yaml"), tmp / "run", progress=False).run()
    return latest_checkpoint(tmp / "run")


def counterfactual(model, tok, prompt: str = "def __init__(self", rank: int = 20) -> Example:
    """An edit whose target is the model's `rank`-th choice (0 = its greedy one) after `prompt`."""
    ids = tok.encode(prompt)
    with torch.no_grad():
        top = model(torch.tensor([ids]))[0, -1].argsort(descending=True)
    return Example(tuple(ids) + (int(top[rank]),), len(ids))


# kl_train settings under which the tiny model's counterfactual is applied (as in test_splice_cli)
LOOSE_KL = ["--method", "kl_train", "--steps", "40", "--lr", "0.03", "--max-ppl-increase", "1", "--max-neutral-kl",
            "10", "--layers", "3"]


def splice_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `felix splice ARGS`: its exit code, stdout and stderr."""
    from felix.cli import main

    capsys.readouterr()
    rc = main(["splice", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def copy_checkpoint(ckpt, tmp_path: Path) -> str:
    """A copy of a (module-scoped) checkpoint without its patch stack, so the stack starts empty and stays the
    test's own."""
    return str(shutil.copytree(ckpt.path, tmp_path / "ckpt", ignore=shutil.ignore_patterns("splices")))


def cli_json(capsys, *args: str) -> tuple[int, dict]:
    """Run `felix ARGS --json`; its exit code and the JSON object on its last line of stdout."""
    from felix.cli import main

    capsys.readouterr()
    rc = main([*args, "--json"])
    return rc, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


class NgramOracle(torch.nn.Module):
    """A "model" that holds every fact of its documents: it predicts the token that followed the last
    six tokens there (the first one seen), so make_edits' fact finding can be checked exactly."""

    def __init__(self, tok, docs: list[str], cfg: ModelConfig):
        super().__init__()
        self.cfg, self.vocab = cfg, cfg.vocab_size
        self.tok_emb = torch.nn.Embedding(1, 1)
        self.table: dict[tuple[int, ...], int] = {}
        for d in docs:
            ids = tok.encode(d)
            for i in range(6, len(ids)):
                self.table.setdefault(tuple(ids[i - 6 : i]), ids[i])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*idx.shape, self.vocab)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                out[b, t, self.table.get(tuple(row[max(0, t - 5) : t + 1]), 1)] = 1.0
        return out


def random_splice_model() -> FelixLM:
    """4 layers, SpliceCore (rank 4) at 1 and 3 with a non-zero b, as a trained model has (untrained otherwise)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, n_layers=4, d_model=32, n_heads=4, d_ff=64, max_seq_len=16, splice_every=2,
                      splice_rank=4)
    model = FelixLM(cfg).eval()
    with torch.no_grad():
        for core in model.splice_cores().values():
            core.b.normal_(std=0.5)
    return model
