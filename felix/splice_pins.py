"""Text pins: the training-text positions an edit's write would reach most, kept unchanged.

`closed_form_a` writes the Δa of least C-energy with Δa uₑ = D at the edit's key uₑ. Such a write moves
another input uₛ by the share ρ(s) = uₛᵀ C⁻¹ uₑ / uₑᵀ C⁻¹ uₑ of D (EXP-46r), so the inputs it would
disturb most can be found in the checkpoint's own text, with no list of neighbours: the positions with the
largest ρ. Pinning the N largest (Δa uₛ = 0 there, as for a neutral prompt) keeps unseen prompts of the
edit's shape: 8 pins per edit took held-out neighbours' next-token locality from 54.1% to 70.6% over 100
entity-fact edits at 16.1M (EXP-46ac). Each pin must cost a little more of the edit's write elsewhere, so
`propose_edit` retries an edit the pins push over its budget without them.

A pin is searched per edited layer, for the key at the position predicting the first target token, where
a fact is decided. Positions on the edit's own lines (its prompt's, its paraphrases') are never pinned,
and neither are lines the caller withholds (the bench withholds its evaluation prompts, so the held-out
neighbours it measures stay unseen). One pin per line: eight positions of one line protect one prompt.

Positions are ranked by their inputs in the training windows, but a pin keeps the position read as a prompt:
its line behind at most `PIN_CONTEXT_LINES` lines, the form of the prompts it is there to protect (the
neighbours a user asks about are short prompts). A line deep in a 128-token window has another input than
the same line as a prompt; pins kept at their window inputs gave 0.9 points of held-out locality where
the script's prompt-form pins gave 16.5 (EXP-46ad against EXP-46ac).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from felix.model import FelixLM
from felix.splice_closed import regularized_covariance
from felix.splice_covariance import COVARIANCE_CHUNK, InputCovariances, down_inputs, inputs_at_targets
from felix.splice_data import _window_length, corpus_windows
from felix.splice_examples import last_position_examples

PIN_WINDOWS = 512  # training windows searched (65,536 positions at 128 tokens), as in EXP-46ac
PIN_SEED = 7  # not the preservation windows' seed: pins are searched in other text than C is measured on
PIN_CONTEXT_LINES = 3  # lines of context a pin is read with as a prompt, as in EXP-46ac


def pin_windows(ckpt, model: FelixLM, n: int = PIN_WINDOWS) -> torch.Tensor:
    """The training windows the pins are searched in."""
    return corpus_windows(ckpt, "train", n, _window_length(model), seed=PIN_SEED)


def last_line(text: str) -> str:
    """The text's last line, stripped: what a pin's line is compared by."""
    return text.rsplit("\n", 1)[-1].strip()


class TextPins:
    """The pin search over fixed training windows, with each layer's down-projection inputs kept until the
    layers below it change (keyed as `InputCovariances` keys its covariances).

    Memory: one bfloat16 row of d_ff per searched position and SpliceCore layer searched (200 MB per layer
    at 65,536 positions and d_ff 1536). The stored inputs only rank; a pin's key is recomputed exactly.
    """

    def __init__(self, windows: torch.Tensor, tok, withheld: Iterable[str] = (),
                 context_lines: int | None = PIN_CONTEXT_LINES):
        self.windows = windows
        self.tok = tok
        self.context_lines = context_lines  # None: keep each pin at its input in its window (EXP-46ad)
        self.withheld = {last_line(t) for t in withheld}  # texts whose last lines no search pins
        self._entries: dict[int, tuple[bytes, torch.Tensor]] = {}
        self.computed = 0  # layers whose inputs were computed (misses)

    @torch.no_grad()
    def inputs(self, model: FelixLM, layer: int) -> torch.Tensor:
        """u at every searched position at `layer`: (positions, d_ff), bfloat16, on the CPU."""
        digest = InputCovariances._below(model, model.splice_state(), layer)
        entry = self._entries.get(layer)
        if entry is None or entry[0] != digest:
            us = torch.cat([down_inputs(model, [layer], chunk)[layer].flatten(0, 1).to(torch.bfloat16).cpu()
                            for chunk in self.windows.split(COVARIANCE_CHUNK)])
            self._entries[layer] = entry = (digest, us)
            self.computed += 1
        return entry[1]

    def _text_to(self, position: int) -> str:
        row, col = divmod(position, self.windows.shape[1])
        return self.tok.decode(self.windows[row, : col + 1].tolist())

    def line_at(self, position: int) -> str:
        """The line (up to and including its token) of a searched position."""
        return last_line(self._text_to(position))

    def prompt_at(self, position: int) -> list[int]:
        """A searched position as a prompt: its line behind at most `context_lines` lines of its window."""
        lines = self._text_to(position).split("\n")
        return self.tok.encode("\n".join(lines[-(self.context_lines + 1):]))

    def shares(self, model: FelixLM, layer: int, key: torch.Tensor, cov: torch.Tensor, ridge: float) -> torch.Tensor:
        """ρ of every searched position for a least-energy write at `key` (d_ff,)."""
        k = key.double().reshape(-1)
        w = torch.linalg.solve(regularized_covariance(cov, ridge), k)
        w = w / (k @ w)
        return self.inputs(model, layer).float() @ w.float()

    def positions(self, model: FelixLM, layer: int, key: torch.Tensor, cov: torch.Tensor, ridge: float, n: int,
                  exclude: Iterable[str] = ()) -> list[int]:
        """The n searched positions with the largest ρ, one per line, none on the last line of a text in
        `exclude` (the edit's prompt and paraphrases) or a withheld one, nor on an empty line or one that
        begins before its window does."""
        if n <= 0:
            return []
        banned = self.withheld | {last_line(t) for t in exclude}
        rho = self.shares(model, layer, key, cov, ridge)
        picks: list[int] = []
        lines: set[str] = set()
        for s in rho.argsort(descending=True).tolist():
            text = self._text_to(s)
            line = last_line(text)
            # a line the window's start cuts is not a prompt anyone asks, and may be an excluded one's tail
            if "\n" not in text or not line or line in banned or line in lines:
                continue
            lines.add(line)
            picks.append(s)
            if len(picks) == n:
                break
        return picks

    @torch.no_grad()
    def select(self, model: FelixLM, layer: int, key: torch.Tensor, cov: torch.Tensor, ridge: float, n: int,
               exclude: Iterable[str] = ()) -> torch.Tensor:
        """The exact inputs u (d_ff, ≤ n) of the pins `positions` picks: each read as a prompt (at its last
        position, as a neutral prompt is kept), or with `context_lines=None` in its window."""
        picks = self.positions(model, layer, key, cov, ridge, n, exclude)
        if not picks:
            return torch.zeros(cov.shape[0], 0)
        if self.context_lines is not None:
            prompts = [self.prompt_at(s) for s in picks]
            return inputs_at_targets(model, [layer], last_position_examples(prompts))[layer]
        t = self.windows.shape[1]
        rows = sorted({s // t for s in picks})
        us = down_inputs(model, [layer], self.windows[rows])[layer].cpu()
        return torch.stack([us[rows.index(s // t), s % t] for s in picks], dim=1)
