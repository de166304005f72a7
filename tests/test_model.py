"""FelixLM against its peer (HF LlamaForCausalLM), its KV cache, its SpliceCore API and its config checks."""

from __future__ import annotations

import math

import pytest
import torch

from felix.config import ModelConfig, load_config
from felix.errors import FelixError
from felix.model import FelixLM, KVCache

transformers = pytest.importorskip("transformers")

from felix.hf_convert import to_hf_model, to_hf_state_dict  # noqa: E402


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=211, n_layers=4, d_model=64, n_heads=4, d_ff=160, max_seq_len=64,
                splice_every=2, splice_rank=4)
    return ModelConfig(**(base | kw))


def make_model(cfg: ModelConfig, splice: bool, seed: int = 0) -> FelixLM:
    torch.manual_seed(seed)
    model = FelixLM(cfg).eval()
    # Random norm weights too, so a mix-up of the two norms in the conversion would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        if splice:
            for i, core in enumerate(model.splice_cores().values()):
                torch.nn.init.normal_(core.b, std=0.05)
                core.gate.fill_(0.5 + i)
    return model


@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("splice", [False, True], ids=["splice-zero", "splice-merged"])
def test_logits_equal_hf_llama(n_kv_heads, splice):
    model = make_model(small_cfg(n_kv_heads=n_kv_heads), splice)
    hf = to_hf_model(model).eval()
    assert hf.config.tie_word_embeddings and hf.lm_head.weight is hf.model.embed_tokens.weight
    assert hf.config.num_key_value_heads == (n_kv_heads or 4)
    idx = torch.randint(0, 211, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf(input_ids=idx).logits
    assert ours.shape == theirs.shape == (2, 37, 211)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    if splice:  # the merge is what made them agree: without it, the logits differ
        sd = to_hf_state_dict(model)
        down = model.layers[1].mlp.down_proj.weight
        assert not torch.equal(sd["model.layers.1.mlp.down_proj.weight"], down)
        torch.testing.assert_close(sd["model.layers.1.mlp.down_proj.weight"] - down,
                                   model.layers[1].mlp.splice.delta_weight())


def test_hf_state_dict_has_llama_names_and_no_extras():
    model = make_model(small_cfg(), splice=False)
    sd = to_hf_state_dict(model)
    assert len(sd) == 1 + 4 * 9 + 2  # embeddings, 9 per layer, final norm, tied lm_head
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]
    assert "model.layers.3.post_attention_layernorm.weight" in sd
    assert not any("splice" in k for k in sd)


def test_initial_loss_is_about_ln_vocab():
    cfg = ModelConfig(vocab_size=4096, n_layers=4, d_model=128, n_heads=4, d_ff=384, max_seq_len=128)
    torch.manual_seed(0)
    model = FelixLM(cfg)
    idx = torch.randint(0, cfg.vocab_size, (4, 129))
    with torch.no_grad():
        logits = model(idx[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), idx[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(math.log(cfg.vocab_size), abs=0.1)


@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_kv_cache_decode_equals_full_forward(n_kv_heads):
    model = make_model(small_cfg(n_kv_heads=n_kv_heads), splice=True)
    idx = torch.randint(0, 211, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.cfg, batch=2, max_len=30, device="cpu")
        # A prefill of 11, a chunk of 5 (several new queries over cached keys), then one at a time.
        parts = [model(idx[:, :11], cache=cache), model(idx[:, 11:16], cache=cache)]
        parts += [model(idx[:, t : t + 1], cache=cache) for t in range(16, 30)]
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="KV cache full"), torch.no_grad():
        model(idx[:, :1], cache=cache)


def test_residual_through_equals_the_full_forwards_hidden_state():
    model = make_model(small_cfg(), splice=True)
    idx = torch.randint(0, 211, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, hidden = model(idx, return_hidden=True)
        for layer in range(model.cfg.n_layers):
            assert torch.equal(model.residual_through(idx, layer), hidden[layer])
        with pytest.raises(ValueError, match="max_seq_len"):
            model.residual_through(torch.zeros(1, 65, dtype=torch.long), 1)


# -- SpliceCore API ------------------------------------------------------------------------------------

def test_splice_state_names_are_stable_and_round_trip():
    a, b = make_model(small_cfg(), splice=True, seed=0), make_model(small_cfg(), splice=False, seed=1)
    state = a.splice_state()
    assert sorted(state) == sorted(f"layers.{layer}.mlp.splice.{k}" for layer in (1, 3) for k in ("a", "b", "gate"))
    assert a.num_splice_params() == sum(v.numel() for k, v in state.items() if not k.endswith("gate"))
    b.load_splice_state(state)
    for name, value in b.splice_state().items():
        assert torch.equal(value, state[name])
    state["layers.1.mlp.splice.b"].add_(1.0)  # a copy: editing it leaves the model alone
    assert not torch.equal(a.splice_state()["layers.1.mlp.splice.b"], state["layers.1.mlp.splice.b"])
    # Only SpliceCore changed hands: b's other weights are still its own.
    assert not torch.equal(a.layers[0].mlp.down_proj.weight, b.layers[0].mlp.down_proj.weight)


def test_splice_twin_shares_every_weight_but_splicecore():
    model = make_model(small_cfg(), splice=True, seed=0)
    twin = model.splice_twin()
    idx = torch.randint(0, 211, (2, 16))
    assert torch.equal(twin(idx), model(idx))
    own = {k: v for k, v in model.state_dict().items() if ".splice." in k}
    for name, t in twin.state_dict().items():
        assert (t.data_ptr() == model.state_dict()[name].data_ptr()) is (name not in own), name
    state = twin.splice_state()
    state["layers.3.mlp.splice.b"] += 0.5
    twin.load_splice_state(state)  # the twin's SpliceCore moves, the model's does not
    assert all(torch.equal(model.state_dict()[k], v) for k, v in own.items())
    assert not torch.equal(twin(idx), model(idx))
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight.mul_(2)  # a base weight is one tensor for both
    assert torch.equal(twin.layers[0].mlp.up_proj.weight, model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("bad, error, match", [
    ({"layers.0.mlp.splice.a": torch.zeros(4, 160)}, KeyError, "not SpliceCore"),
    ({"layers.1.mlp.down_proj.weight": torch.zeros(64, 160)}, KeyError, "not SpliceCore"),
    ({"layers.1.mlp.splice.a": torch.zeros(4, 161)}, ValueError, "shape"),
    ({"layers.3.mlp.splice.b": torch.full((64, 4), float("nan"))}, ValueError, "NaN"),
])
def test_load_splice_state_rejects_bad_input_without_writing(bad, error, match):
    model = make_model(small_cfg(), splice=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = model.splice_state()
    for k, v in state.items():
        state[k] = v + 1.0  # valid changes that must not land when anything else in the set is bad
    state |= bad
    with pytest.raises(error, match=match):
        model.load_splice_state(state)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_splice_state_strict_requires_every_tensor():
    model = make_model(small_cfg(), splice=True)
    partial = {"layers.1.mlp.splice.gate": torch.tensor(0.0)}
    with pytest.raises(KeyError, match="missing"):
        model.load_splice_state(partial)
    model.load_splice_state(partial, strict=False)
    assert model.splice_state()["layers.1.mlp.splice.gate"].item() == 0.0


# -- configs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, field, message", [
    ("model:\n  d_modle: 64\n", "model.d_modle", "unknown key"),
    ("model:\n  n_layers: three\n", "model.n_layers", "integer"),
    ("train:\n  compile: sometimes\n", "train.compile", "boolean"),
    ("model:\n  d_model: 100\n  n_heads: 3\n", "model", "n_heads (3) must divide d_model (100)"),
    ("model:\n  n_heads: 8\n  n_kv_heads: 3\n", "model", "n_kv_heads (3) must divide n_heads (8)"),
])
def test_config_errors_name_file_and_field(tmp_path, text, field, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(FelixError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert str(path) in msg and f"{field}:" in msg and message in msg


def test_packaged_configs_load_and_felix_300m_is_in_range():
    for name in ("demo", "felix-50m", "felix-300m", "felix-500m", "felix-1b"):
        load_config(name)
    with torch.device("meta"):
        model = FelixLM(load_config("felix-300m").model)
    assert 300e6 <= model.num_params() <= 500e6
    assert model.num_splice_params() == 6 * 8 * (4096 + 1024)  # layers 3, 7, ..., 23 at rank 8


# -- the fused training loss -----------------------------------------------------------------------------

def _loss_and_grads(model: FelixLM, idx, targets, fused: bool, dtype=torch.float32):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        if fused:
            loss = model(idx, targets=targets)
        else:
            logits = model(idx)
    if not fused:
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_fused_loss_equals_logits_cross_entropy(dtype, tol):
    model = make_model(small_cfg(vocab_size=1000), splice=True).train()
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 1000, (3, 40), generator=gen)
    targets = torch.randint(0, 1000, (3, 40), generator=gen)
    targets[0, :7] = -100  # ignored positions (prompt tokens in SFT) count in neither loss nor gradient
    ref_loss, ref_grads = _loss_and_grads(model, idx, targets, fused=False, dtype=dtype)
    loss, grads = _loss_and_grads(model, idx, targets, fused=True, dtype=dtype)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, atol=tol, rtol=0)
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().item() or 1.0
        torch.testing.assert_close(g / scale, ref_grads[name] / scale, atol=tol, rtol=0, msg=name)


@pytest.mark.parametrize("chunk_rows", [7, 64, None])
def test_linear_cross_entropy_chunks(chunk_rows):
    from felix.model import linear_cross_entropy

    gen = torch.Generator().manual_seed(4)
    h = torch.randn(50, 16, generator=gen, requires_grad=True)
    w = torch.randn(300, 16, generator=gen, requires_grad=True)
    t = torch.randint(0, 300, (50,), generator=gen)
    t[::5] = -100
    ref = torch.nn.functional.cross_entropy(h @ w.t(), t)
    ref_gh, ref_gw = torch.autograd.grad(ref, (h, w))
    loss = linear_cross_entropy(h, w, t, chunk_rows=chunk_rows)
    gh, gw = torch.autograd.grad(2.0 * loss, (h, w))  # an upstream gradient scales both
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, 2.0 * ref_gh)
    torch.testing.assert_close(gw, 2.0 * ref_gw)
