"""FelixLM <-> HF transformers `LlamaForCausalLM`: the peer the model is checked and benchmarked against.

FelixLM keeps Llama's layout (rotate-half RoPE, q/k/v/o and gate/up/down names, tied embeddings),
so conversion is a renaming plus one fold: each SpliceCore is a LoRA on its layer's down_proj,
merged here as W_down + gate·B·A, so the HF model computes the same function whatever the
SpliceCore holds. transformers is imported lazily: it is a test/benchmark dependency only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from felix.config import ModelConfig
from felix.model import FelixLM

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM


def hf_llama_config(cfg: ModelConfig, attn_implementation: str = "sdpa") -> LlamaConfig:
    """The `LlamaConfig` of the same shape (no biases, SiLU gate, tied embeddings)."""
    from transformers import LlamaConfig

    hf = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        # transformers 5 reads rope_parameters; 4.x ignores it and reads rope_theta (10000 by default)
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=cfg.init_std,
        bos_token_id=None,
        eos_token_id=None,
    )
    hf._attn_implementation = attn_implementation
    return hf


@torch.no_grad()
def to_hf_state_dict(model: FelixLM) -> dict[str, torch.Tensor]:
    """FelixLM weights under HF Llama names, SpliceCores merged into down_proj (copies, same dtype)."""
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.tok_emb.weight.detach().clone()}
    for i, block in enumerate(model.layers):
        pre = f"model.layers.{i}."
        attn, mlp = block.attn, block.mlp
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[pre + f"self_attn.{name}.weight"] = getattr(attn, name).weight.detach().clone()
        sd[pre + "mlp.gate_proj.weight"] = mlp.gate_proj.weight.detach().clone()
        sd[pre + "mlp.up_proj.weight"] = mlp.up_proj.weight.detach().clone()
        down = mlp.down_proj.weight.detach().clone()
        if mlp.splice is not None:
            delta = mlp.splice.delta_weight()
            if delta.abs().max() > 0:
                down += delta.to(down.dtype)
        sd[pre + "mlp.down_proj.weight"] = down
        sd[pre + "input_layernorm.weight"] = block.attn_norm.weight.detach().clone()
        sd[pre + "post_attention_layernorm.weight"] = block.mlp_norm.weight.detach().clone()
    sd["model.norm.weight"] = model.norm.weight.detach().clone()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied
    return sd


def to_hf_model(model: FelixLM, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """A `LlamaForCausalLM` computing the same logits as `model` (same device and dtype)."""
    from transformers import LlamaForCausalLM

    param = next(model.parameters())
    with torch.device(param.device):
        hf = LlamaForCausalLM(hf_llama_config(model.cfg, attn_implementation))
    hf.load_state_dict(to_hf_state_dict(model), strict=True)
    return hf.to(param.dtype).train(model.training)
