"""The SpliceCore inputs an edit is keyed on, and their second moments.

u, the input of a layer's down-projection (and of its SpliceCore), is what `closed_form_a` keys an edit
on; C = E[u uᵀ] over preservation text (plus, with preservation prompts, their last tokens' moment) is the
metric its least-energy writes are measured in. `InputCovariances` keeps C per layer across a sequence of
edits until the layers below change; `BottomUpCovariances` walks a model bottom up for GPTQ folding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from felix.model import FelixLM
from felix.splice_examples import Example, batch_examples, greedy_continuations, last_position_examples, model_device
from felix.splicecore import splice_tensor_layer


def down_inputs(model: FelixLM, layers: list[int], idx: torch.Tensor) -> dict[int, torch.Tensor]:
    """u, the input of each layer's down-projection (and SpliceCore), for token ids idx: (B, T, d_ff).

    Only the blocks up to the last of `layers` run: no later block and no head.
    """
    if not layers:
        return {}
    us: dict[int, torch.Tensor] = {}
    hooks = [model.layers[L].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args, L=L: us.__setitem__(L, args[0].detach().float())) for L in layers]
    try:
        with torch.no_grad():
            model.residual_through(idx.to(model_device(model)), max(layers))
    finally:
        for h in hooks:
            h.remove()
    return us


def inputs_at_targets(model: FelixLM, layers: list[int], examples: list[Example]) -> dict[int, torch.Tensor]:
    """u at every completion-predicting position, per layer: (d_ff, n_positions)."""
    if not examples:
        return {L: torch.zeros(model.cfg.d_ff, 0) for L in layers}
    idx, labels, _ = batch_examples(examples, model_device(model))
    # the last column predicts no completion token; without it a prompt of max_seq_len tokens, kept at its last
    # position (`last_position_examples`: a token 0 after it, never read), fits the model
    us = down_inputs(model, layers, idx[:, :-1])
    pos = (labels[:, :-1] != -100).cpu()
    return {L: us[L].cpu()[pos].t() for L in layers}


COVARIANCE_CHUNK = 32  # preservation windows per forward pass: memory stays flat however many there are


def _second_moment(model: FelixLM, layers: list[int], preserve: torch.Tensor,
                   project: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """E[x xᵀ] per layer over every position of the preservation windows, on the CPU, where x is u or,
    with `project[L]` (m x d_ff), project[L] @ u. Sums run on the model's device, chunk by chunk."""
    sums: dict[int, torch.Tensor] = {}
    n = 0
    for chunk in preserve.split(COVARIANCE_CHUNK):
        for L, u in down_inputs(model, layers, chunk).items():
            x = u.flatten(0, 1)
            if project is not None:
                x = x @ project[L].to(x.device, x.dtype).t()
            sums[L] = sums[L] + x.t() @ x if L in sums else x.t() @ x
        n += chunk.numel()
    return {L: (c / n).cpu() for L, c in sums.items()}


def input_covariance(model: FelixLM, layers: list[int], preserve: torch.Tensor) -> dict[int, torch.Tensor]:
    """E[u uᵀ] of the down-projection inputs over preservation text, per layer (d_ff x d_ff)."""
    return _second_moment(model, layers, preserve)


class BottomUpCovariances:
    """`input_covariance` of one layer after another, bottom up, for a pass that rewrites each layer's
    SpliceCore before asking for the next (GPTQ folding): every layer reads its inputs through the layers
    below as they are by then.

    Each preservation chunk's residual stream is carried up the model, so every block runs once: a fresh
    `input_covariance` per layer runs all the blocks below it again (84 block passes instead of 24 at
    felix-300m's 6 SpliceCore layers). The figures are bit for bit `input_covariance`'s: the same chunks
    go through the same operations in the same order. Memory: one d_model residual per preservation token.

    `entering` (per chunk, the residual stream entering block `start`, as an earlier walk recorded it)
    starts the walk at block `start` instead of the embeddings; `record` keeps, per layer asked for, the
    residual stream entering its block (on the CPU, in `self.entering`), which is what a later walk resumes
    from. A resumed walk gives bit for bit the figures of a whole one over the same blocks below `start`.
    """

    def __init__(self, model: FelixLM, preserve: torch.Tensor, entering: list[torch.Tensor] | None = None,
                 start: int = 0, record: bool = False):
        self.model, self.chunks = model, list(preserve.split(COVARIANCE_CHUNK))
        self.n_tokens = preserve.numel()
        if (entering is None) != (start == 0) or entering is not None and len(entering) != len(self.chunks):
            raise ValueError("a walk starting above block 0 needs one entering residual per preservation chunk")
        dev = model_device(model)
        # per chunk: the residual entering block `self.next`
        self.states = None if entering is None else [x.to(dev) for x in entering]
        self.next = start
        self.attended = False  # whether `states` already went through block `self.next`'s attention
        self.entering: dict[int, list[torch.Tensor]] | None = {} if record else None

    def _start(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Check that `layer` is still ahead; embed the chunks if no block ran yet; the RoPE tables."""
        if layer < self.next or layer == self.next and self.attended:
            raise ValueError(f"layer {layer} was already passed (bottom-up order)")
        model = self.model
        if self.states is None:
            self.states = [model.tok_emb(c.to(model_device(model))) for c in self.chunks]
        n = self.chunks[0].shape[1]
        return model.rope_cos[:n], model.rope_sin[:n]

    def _enter(self, x: torch.Tensor, layer: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One chunk's stream carried from where the walk stands to the entrance of block `layer`."""
        for j in range(self.next, layer):
            block = self.model.layers[j]
            if not (j == self.next and self.attended):
                x = block.attend(x, cos, sin)
            x = x + block.mlp(block.mlp_norm(x))
        return x

    @torch.no_grad()
    def streams(self, layers: list[int]) -> dict[int, list[torch.Tensor]]:
        """The residual stream entering each of `layers`' blocks (ascending, not yet passed), per chunk, on the
        CPU: what a walk recording at those layers keeps, by the same arithmetic, with no covariance."""
        out: dict[int, list[torch.Tensor]] = {}
        for layer in layers:
            cos, sin = self._start(layer)
            self.states = [self._enter(x, layer, cos, sin) for x in self.states]
            self.next, self.attended = layer, False
            out[layer] = [x.to("cpu", copy=True) for x in self.states]
        return out

    @torch.no_grad()
    def covariance(self, layer: int) -> torch.Tensor:
        """E[u uᵀ] at `layer` (d_ff x d_ff, on the CPU); layers must be asked for in ascending order."""
        cos, sin = self._start(layer)
        block = self.model.layers[layer]
        if self.entering is not None:
            self.entering[layer] = []
        total = None
        for i, x in enumerate(self.states):
            x = self._enter(x, layer, cos, sin)
            if self.entering is not None:
                self.entering[layer].append(x.to("cpu", copy=True))
            x = block.attend(x, cos, sin)  # `_start` refused a layer whose attention already ran
            self.states[i] = x
            u = block.mlp.down_input(block.mlp_norm(x)).float().flatten(0, 1)
            total = u.t() @ u if total is None else total + u.t() @ u
        self.next, self.attended = layer, True
        return (total / self.n_tokens).cpu()


class InputCovariances:
    """`input_covariance` over fixed preservation windows, kept per layer until it can have changed.

    u at layer L is computed from the residual stream entering L, so it depends on the SpliceCores of the
    layers below L and not on L's own: an edit that writes layer L (or above) leaves L's covariance as it
    was. Each entry is keyed by a digest of the SpliceCore tensors below its layer (and the model), and a
    miss recomputes every missing layer in one forward pass: bit for bit what `input_covariance` gives.

    With `prompts` (token ids) and a positive `prompt_weight` w, each entry is the text's C plus the prompts'
    moment N (`prompt_moment`) scaled to w·tr C: `with_prompt_moment` (EXP-46ah). With `prompt_tokens` n > 1,
    N also covers the positions predicting each prompt's 2nd..nth greedy tokens, generated once, by the
    model as it is at the first `get` (the behaviour to keep), so the entries stay keyed by the layers below.
    """

    def __init__(self, preserve: torch.Tensor, prompts: Sequence[Sequence[int]] = (), prompt_weight: float = 0.0,
                 prompt_tokens: int = 1):
        if prompt_weight < 0:
            raise ValueError(f"prompt_weight must be 0 or more, got {prompt_weight}")
        if prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be at least 1, got {prompt_tokens}")
        self.preserve = preserve
        self.prompts = [list(p) for p in prompts if p] if prompt_weight > 0 else []
        self.prompt_weight = prompt_weight
        self.prompt_tokens = prompt_tokens
        self.continuations: list[tuple[int, ...]] | None = None  # set at the first get when prompt_tokens > 1
        self._entries: dict[int, tuple[bytes, torch.Tensor]] = {}
        self.computed = 0  # layers computed so far (misses)

    @staticmethod
    def _below(model: FelixLM, state: dict[str, torch.Tensor], layer: int) -> bytes:
        h = hashlib.blake2b(str(id(model)).encode(), digest_size=16)
        for name, t in sorted(state.items()):
            if splice_tensor_layer(name) < layer:
                h.update(name.encode())
                h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return h.digest()

    def keep_behaviour(self, model: FelixLM) -> None:
        """Take the prompts' later greedy tokens (`prompt_tokens` > 1) from `model` now, not at the first `get`."""
        if self.prompts and self.prompt_tokens > 1 and self.continuations is None:
            self.continuations = greedy_continuations(model, self.prompts, self.prompt_tokens)

    def get(self, model: FelixLM, layers: list[int]) -> dict[int, torch.Tensor]:
        state = model.splice_state()
        keys = {L: self._below(model, state, L) for L in layers}
        missing = [L for L in layers if self._entries.get(L, (None,))[0] != keys[L]]
        if missing:
            covs = input_covariance(model, missing, self.preserve)
            if self.prompts:
                self.keep_behaviour(model)
                moments = prompt_moment(model, missing, self.prompts, self.continuations)
                covs = {L: with_prompt_moment(c, moments[L], self.prompt_weight) for L, c in covs.items()}
            for L, c in covs.items():
                self._entries[L] = (keys[L], c)
            self.computed += len(missing)
        return {L: self._entries[L][1] for L in layers}


PROMPT_CHUNK = 256  # preservation prompts per forward pass


def prompt_moment(model: FelixLM, layers: list[int], prompts: Sequence[Sequence[int]],
                  continuations: Sequence[Sequence[int]] | None = None) -> dict[int, torch.Tensor]:
    """E[u uᵀ] per layer over the last token of each prompt (token ids): the inputs a prompt's next token
    is read from, as an edit's own key and the neighbours a user asks about are.

    With `continuations` (the prompts' next tokens and those after them), the mean of that moment and the one
    over the positions predicting the later tokens: a prompt's next token weighs as much as the rest of its
    answer. A moment of next-token inputs alone pushes the write into the answers' positions (EXP-46ak).
    """
    first = _moment(model, layers, last_position_examples([list(p) for p in prompts]))
    if continuations is None:
        return first
    later = [Example((*p, *c), len(p) + 1) for p, c in zip(prompts, continuations, strict=True) if len(c) > 1]
    if not later:
        return first
    rest = _moment(model, layers, later)
    return {L: (first[L] + rest[L]) / 2 for L in layers}


def _moment(model: FelixLM, layers: list[int], examples: list[Example]) -> dict[int, torch.Tensor]:
    """E[u uᵀ] per layer over every completion-predicting position of `examples`, PROMPT_CHUNK at a time."""
    sums: dict[int, torch.Tensor] = {L: torch.zeros(model.cfg.d_ff, model.cfg.d_ff) for L in layers}
    for i in range(0, len(examples), PROMPT_CHUNK):
        for L, u in inputs_at_targets(model, layers, examples[i : i + PROMPT_CHUNK]).items():
            sums[L] += u @ u.t()
    n = sum(len(e.ids) - e.n_prompt for e in examples)
    return {L: c / max(n, 1) for L, c in sums.items()}


def with_prompt_moment(cov: torch.Tensor, moment: torch.Tensor, weight: float) -> torch.Tensor:
    """C + w·(tr C / tr N)·N: the text's input moments with the prompts' moment N added at w times their
    total energy. Short prompts' last tokens are a corner of input space that 128-token windows seldom
    visit, so C alone weighs directions shared by every prompt of a kind as if no text used them."""
    scale = weight * float(cov.trace()) / max(float(moment.trace()), 1e-30)
    return cov + scale * moment


def preserved_covariance(model: FelixLM, layers: list[int], preserve: torch.Tensor) -> dict[int, torch.Tensor]:
    """E[k kᵀ] of the SpliceCore keys over preservation text, per layer (r x r)."""
    cores = model.splice_cores()
    return _second_moment(model, layers, preserve, {L: cores[L].a.detach().float() for L in layers})
