"""OPT (facebook/opt-*): learned positions stored at p + 2, LayerNorm (pre- or post-norm), ReLU MLP fc1/fc2,
q scaled after q_proj, lm_head tied to the token embedding."""

from __future__ import annotations

from .architecture import Architecture, heads_of
from .common import ExportError, tied_weights

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding stores position p at row p + 2 (a fairseq legacy)


def describe(hf_model) -> Architecture:
    cfg = hf_model.config
    if cfg.activation_function != "relu":
        raise ExportError(f"OPT with activation {cfg.activation_function!r} is not supported (relu only)")
    dec = "model.decoder"
    heads, kv_heads, head_dim = heads_of(hf_model, f"{dec}.layers.0.self_attn")
    return Architecture(
        model_type="opt", num_layers=cfg.num_hidden_layers, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, vocab_size=cfg.vocab_size, max_positions=cfg.max_position_embeddings,
        embed_tokens=f"{dec}.embed_tokens", layers=f"{dec}.layers",
        final_norm=f"{dec}.final_layer_norm" if hf_model.model.decoder.final_layer_norm is not None else None,
        q_proj="self_attn.q_proj", k_proj="self_attn.k_proj", v_proj="self_attn.v_proj", o_proj="self_attn.out_proj",
        attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm", mlp=("fc1", "fc2"), mlp_kind="relu",
        activation="activation_fn", attention_scale=hf_model.get_submodule(f"{dec}.layers.0.self_attn").scaling,
        scale_queries=True, positions="learned", embed_positions=f"{dec}.embed_positions",
        position_offset=POSITION_OFFSET, pre_norm=cfg.do_layer_norm_before,
        project_in=f"{dec}.project_in" if hf_model.model.decoder.project_in is not None else None,
        project_out=f"{dec}.project_out" if hf_model.model.decoder.project_out is not None else None,
        tied_lm_head="lm_head.weight" in tied_weights(hf_model),
    )
