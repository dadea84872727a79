"""OPT decoder with a static KV cache, written for `torch.export` -> ExecuTorch (batch 1, fp32).

It reuses the Hugging Face module's own Linear/LayerNorm/Embedding objects, so the exported program holds the very
tensors `model.state_dict()` names, and only rewrites the parts `torch.export` cannot take from transformers: the
cache and the positions. One method, `forward(tokens, input_pos)`, serves prefill (seq = 1..max_seq_len) and decode
(seq = 1):

    tokens    int64 [1, seq]   token ids
    input_pos int64 [seq]      their absolute positions, consecutive: start, start+1, ...
    -> logits float32 [1, seq, vocab]

Each layer keeps k/v caches as mutable buffers `[max_seq_len, heads, head_dim]`, written in place with `index_put_` at
`input_pos`. Attention looks at all max_seq_len slots under a mask `slot <= position`, so every shape but seq is
static and stale slots beyond the current position never count.

    >>> from shira_edge.models import load_model
    >>> model, _ = load_model("tiny-opt")
    >>> m = OptStaticCache(model, max_seq_len=16)
    >>> import torch; m(torch.tensor([[2, 7, 9]]), torch.arange(3)).shape
    torch.Size([1, 3, 512])
"""

from __future__ import annotations

import torch
from torch import nn

from .common import residual

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding stores positions shifted by 2 (a fairseq legacy)


class OptStaticCache(nn.Module):
    def __init__(self, hf_model: nn.Module, max_seq_len: int = 256):
        super().__init__()
        cfg = hf_model.config
        dec = hf_model.model.decoder
        if max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        if cfg.activation_function != "relu":
            raise ValueError(f"activation {cfg.activation_function!r} is not supported by this export (relu only)")
        self.max_seq_len = max_seq_len
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.pre_norm = cfg.do_layer_norm_before
        self.decoder = dec
        self.lm_head = hf_model.lm_head
        for i in range(len(dec.layers)):
            shape = (max_seq_len, self.heads, self.head_dim)
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        dec = self.decoder
        x = dec.embed_tokens(tokens)
        if dec.project_in is not None:
            x = dec.project_in(x)
        x = x + dec.embed_positions.weight[input_pos + POSITION_OFFSET].unsqueeze(0)
        # [seq, max_seq_len]: a query at position p sees cache slots 0..p
        mask = torch.arange(self.max_seq_len, device=tokens.device).unsqueeze(0) <= input_pos.unsqueeze(1)
        for i, layer in enumerate(dec.layers):
            x = self._layer(i, layer, x, input_pos, mask)
        if dec.final_layer_norm is not None:
            x = dec.final_layer_norm(x)
        if dec.project_out is not None:
            x = dec.project_out(x)
        return self.lm_head(x)

    def _layer(self, i: int, layer: nn.Module, x, input_pos, mask):
        x = residual(x, layer.self_attn_layer_norm,
                     lambda h: self._attention(i, layer.self_attn, h, input_pos, mask), self.pre_norm)
        return residual(x, layer.final_layer_norm, lambda h: layer.fc2(torch.relu(layer.fc1(h))), self.pre_norm)

    def _attention(self, i: int, attn: nn.Module, x, input_pos, mask):
        seq = x.shape[1]
        split = (seq, self.heads, self.head_dim)
        q = (attn.q_proj(x) * attn.scaling).view(split).transpose(0, 1)          # [H, seq, D]
        k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
        k_cache.index_put_((input_pos,), attn.k_proj(x).view(split))
        v_cache.index_put_((input_pos,), attn.v_proj(x).view(split))
        # ExecuTorch gives mutated buffers no defined initial state: zero the slots no query can see yet, so
        # that garbage (even NaN) there cannot leak through 0 * NaN in the value product.
        written = (torch.arange(self.max_seq_len, device=x.device) <= input_pos[-1]).view(-1, 1, 1)
        v_cache = torch.where(written, v_cache, torch.zeros_like(v_cache))
        k, v = k_cache.transpose(0, 1), v_cache.transpose(0, 1)                   # [H, max_seq_len, D]
        scores = torch.matmul(q, k.transpose(1, 2)).masked_fill(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), v)                      # [H, seq, D]
        return attn.out_proj(out.transpose(0, 1).reshape(1, seq, self.heads * self.head_dim))
