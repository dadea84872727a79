"""Llama (Llama 2/3.x, TinyLlama, SmolLM2): RMSNorm, rotary positions (any static rope_type, e.g. Llama-3's
"llama3" scaling, taken from the model's own rotary module), grouped-query attention, SwiGLU MLP, optionally a
tied lm_head. Mistral and Qwen2 are this plus one difference each (arch_mistral.py, arch_qwen2.py)."""

from __future__ import annotations

from .architecture import Architecture, heads_of
from .common import ExportError, tied_weights

# rope_types whose inv_freq is fixed at init; "dynamic" and "longrope" change it with the sequence length.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def describe(hf_model, **changes) -> Architecture:
    cfg = hf_model.config
    rotary = hf_model.model.rotary_emb
    if rotary.rope_type not in STATIC_ROPE:
        raise ExportError(f"{cfg.model_type}: rope_type {rotary.rope_type!r} is not supported (its frequencies "
                          f"depend on the sequence length); supported: {', '.join(STATIC_ROPE)}")
    heads, kv_heads, head_dim = heads_of(hf_model, "model.layers.0.self_attn")
    fields = dict(
        model_type=cfg.model_type, num_layers=cfg.num_hidden_layers, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, vocab_size=cfg.vocab_size, max_positions=cfg.max_position_embeddings,
        embed_tokens="model.embed_tokens", layers="model.layers", final_norm="model.norm",
        q_proj="self_attn.q_proj", k_proj="self_attn.k_proj", v_proj="self_attn.v_proj", o_proj="self_attn.o_proj",
        attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
        mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), mlp_kind="swiglu", activation="mlp.act_fn",
        attention_scale=hf_model.get_submodule("model.layers.0.self_attn").scaling, scale_queries=False,
        positions="rope", rotary="model.rotary_emb", rope_type=rotary.rope_type,
        tied_lm_head="lm_head.weight" in tied_weights(hf_model),
    )
    return Architecture(**{**fields, **changes})
