"""`PrefixMemo` gives bitwise the forward it replaces, through any SpliceCore history, and runs fewer blocks."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from felix.config import ModelConfig
from felix.model import FelixLM
from felix.prefix_memo import prefix_memo

CFG = ModelConfig(vocab_size=64, n_layers=6, d_model=32, n_heads=4, d_ff=64, max_seq_len=16, splice_every=2,
                  splice_rank=4)


def model_with_live_splices() -> FelixLM:
    torch.manual_seed(0)
    model = FelixLM(CFG).eval()
    with torch.no_grad():
        for core in model.splice_cores().values():
            core.b.normal_(std=0.3)
    return model


@contextlib.contextmanager
def counting_blocks(model: FelixLM) -> Iterator[list[int]]:
    """The blocks run inside, counted by wrapping their `forward` (a forward hook would keep the memo from
    skipping them: it reads them)."""
    ran: list[int] = []

    def counted(block):
        def forward(*args, **kwargs):
            ran.append(block.layer)
            return type(block).forward(block, *args, **kwargs)
        return forward

    for b in model.layers:
        b.forward = counted(b)
    try:
        yield ran
    finally:
        for b in model.layers:
            del b.forward


def blocks_run(model: FelixLM, ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Logits of a no-grad forward, and the blocks it ran."""
    with counting_blocks(model) as ran, torch.no_grad():
        return model(ids), ran


# one step of a SpliceCore history: (layer, tensor, scale) nudges a tensor, (None, ...) restores the start
steps = st.lists(st.tuples(st.sampled_from([None, 1, 3, 5]), st.sampled_from(["a", "b", "gate"]),
                           st.floats(-2, 2, allow_nan=False)), min_size=1, max_size=8)


@settings(max_examples=30, deadline=None)
@given(history=steps, seed=st.integers(0, 2**16))
def test_every_state_of_a_history_gives_the_full_forward_bitwise(history, seed):
    model = model_with_live_splices()
    start = model.splice_state()
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 64, (3, 9), generator=g), torch.randint(0, 64, (2, 16), generator=g)]
    with prefix_memo(model) as memo:
        for layer, name, scale in history:
            with torch.no_grad():
                if layer is None:
                    model.load_splice_state(start)
                else:
                    t = getattr(model.splice_cores()[layer], name)
                    t.add_(scale * torch.randn(t.shape, generator=g))
            for ids in batches:
                got = blocks_run(model, ids)[0]
                model.prefix_memo = None
                want = blocks_run(model, ids)[0]
                model.prefix_memo = memo
                assert torch.equal(got, want)
    assert model.prefix_memo is None


def test_only_the_blocks_from_the_lowest_changed_splice_core_run_again():
    model = model_with_live_splices()
    ids = torch.randint(0, 64, (2, 12))
    with prefix_memo(model):
        assert blocks_run(model, ids)[1] == list(range(6))  # first sight: all of it
        assert blocks_run(model, ids)[1] == [5]  # nothing changed: the highest SpliceCore block on
        with torch.no_grad():
            model.layers[5].mlp.splice.b.mul_(2)
        assert blocks_run(model, ids)[1] == [5]
        with torch.no_grad():
            model.layers[3].mlp.splice.a.mul_(2)
        assert blocks_run(model, ids)[1] == list(range(6))  # kept only from block 5: the prefix again
        assert blocks_run(model, ids)[1] == [3, 4, 5]
        assert blocks_run(model, ids[:1])[1] == list(range(6))  # other ids: nothing kept


def test_a_changed_frozen_weight_or_a_forward_with_gradients_bypasses_what_was_kept():
    model = model_with_live_splices()
    ids = torch.randint(0, 64, (2, 12))
    with prefix_memo(model) as memo:
        blocks_run(model, ids)
        with torch.no_grad():
            model.layers[0].mlp.up_proj.weight.mul_(1.5)  # not SpliceCore: every kept residual is stale
        got, ran = blocks_run(model, ids)
        assert ran == list(range(6)) and memo.misses == 2
        model.layers[2].attn.v_proj.weight.data = model.layers[2].attn.v_proj.weight.data * 0.5  # new storage
        assert blocks_run(model, ids)[1] == list(range(6))
        ran = []
        hook = model.layers[0].register_forward_hook(lambda *_: ran.append(0))
        model(ids).sum().backward()  # training reads every block, with gradients
        hook.remove()
        assert ran == [0] and model.layers[0].mlp.up_proj.weight.grad is not None


def test_a_twin_or_a_copy_made_under_a_memo_starts_without_one():
    model = model_with_live_splices()
    with prefix_memo(model):
        blocks_run(model, torch.randint(0, 64, (2, 12)))
        assert model.splice_twin().prefix_memo is None and copy.deepcopy(model).prefix_memo is None
        assert model.prefix_memo is not None and model.prefix_memo.entries


def test_a_forward_under_autocast_does_not_reuse_a_full_precision_residual():
    model = model_with_live_splices()
    ids = torch.randint(0, 64, (2, 12))
    with prefix_memo(model):
        full = blocks_run(model, ids)[0]
        with torch.autocast("cpu", torch.bfloat16):
            low, ran = blocks_run(model, ids)
        assert ran == list(range(6)) and low.dtype == torch.bfloat16 and not torch.equal(low.float(), full)


def test_keys_read_by_hooks_are_the_full_forwards_and_their_blocks_run():
    """`down_inputs` hooks the down-projections of the layers it reads: the memo starts no higher than the
    lowest of them (nor than the lowest changed SpliceCore), and every hooked layer sees what a full forward
    gives it. Before hooks were looked for, a hook below the memo's start never ran."""
    from felix.splice_covariance import down_inputs

    model = model_with_live_splices()
    ids = torch.randint(0, 64, (3, 10))
    with prefix_memo(model):
        for layers, change, first in (([3, 5], None, 0), ([3, 5], None, 3), ([3, 5], 5, 3), ([1, 5], 3, 0),
                                      ([1, 5], None, 1), ([3], 1, 1), ([5], None, 1)):  # 1's change: not its input
            if change is not None:
                with torch.no_grad():
                    model.layers[change].mlp.splice.a.mul_(1.5)
            with counting_blocks(model) as ran:
                got = down_inputs(model, layers, ids)
            assert ran == list(range(first, max(layers) + 1)), (layers, change)
            memo, model.prefix_memo = model.prefix_memo, None
            want = down_inputs(model, layers, ids)
            model.prefix_memo = memo
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_forward_hook_on_a_block_below_the_change_still_runs():
    """A forward with hooks reads what it hooks (attributions, logit lens): the blocks they sit on run."""
    model = model_with_live_splices()
    ids = torch.randint(0, 64, (2, 12))
    seen = []
    with prefix_memo(model):
        blocks_run(model, ids)
        hook = model.layers[1].mlp.register_forward_hook(lambda _m, _i, out: seen.append(out))
        with torch.no_grad():
            model.layers[5].mlp.splice.b.mul_(2)
        assert blocks_run(model, ids)[1] == list(range(6))  # kept only from block 5
        assert blocks_run(model, ids)[1] == list(range(1, 6)) and len(seen) == 2
        hook.remove()
        assert blocks_run(model, ids)[1] == [5]  # the hook gone, the memo skips them again
