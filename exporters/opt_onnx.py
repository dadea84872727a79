"""OPT written for `torch.onnx.export(dynamo=True)`: explicit positions, mask and KV cache, and every adaptable
Linear weight kept as one plain, named initializer.

Why not export the Hugging Face module as is: its attention projections come out as transposed copies named
`val_NN` (the exporter folds the transpose of `F.linear` on a 3-D input into a new constant), its positions come
from `cumsum(attention_mask)[:, past:]` (a data-dependent slice) and its SDPA path branches on `is_causal`. This
module reuses the HF model's LayerNorm/Embedding objects and computes the same math, but

  * each adaptable `nn.Linear` becomes `LinearT`: `x @ weight_t + bias` with `weight_t = W.T` stored contiguous, so
    the ONNX initializer `<hf module path>.weight_t` holds exactly W^T ("transposed" layout, (in, out) row-major)
    and feeds a MatMul directly;
  * positions, the padding mask and the past keys/values are graph inputs;
  * the tied lm_head reads the embedding table itself through Gemm(transB=1), so no transposed copy exists.

Graph I/O (B batch, S new tokens, P past tokens; P = 0 on the first step):

    input_ids       int64 [B, S]
    attention_mask  int64 [B, P+S]   1 = real token, 0 = padding, over past and new tokens
    position_ids    int64 [B, S]     0-based positions of the new tokens (OPT's +2 offset is added inside)
    past.{i}.key / past.{i}.value    float32 [B, heads, P, head_dim]
    -> logits float32 [B, S, vocab], present.{i}.key / present.{i}.value float32 [B, heads, P+S, head_dim]

    >>> import torch
    >>> from shira_edge.models import load_model
    >>> hf, _ = load_model("tiny-opt")
    >>> m = OPTForONNX(hf)
    >>> ids = torch.tensor([[2, 7, 9]])
    >>> logits, *present = m(ids, torch.ones_like(ids), torch.arange(3)[None], *m.empty_past(1))
    >>> bool((logits - hf(ids).logits).abs().max() < 1e-5), tuple(present[0].shape)
    (True, (1, 4, 3, 8))
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .common import residual

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding stores position p at row p + 2 (a fairseq legacy)
WEIGHT_SUFFIX = ".weight_t"  # initializer name = HF module path + this suffix


class LinearT(nn.Module):
    """`nn.Linear` with its weight stored transposed and contiguous: the ONNX initializer is W^T, untouched."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


class _Attention(nn.Module):
    def __init__(self, attn: nn.Module, heads: int):
        super().__init__()
        self.q_proj, self.k_proj = LinearT(attn.q_proj), LinearT(attn.k_proj)
        self.v_proj, self.out_proj = LinearT(attn.v_proj), LinearT(attn.out_proj)
        self.heads, self.scaling = heads, attn.scaling
        self.head_dim = attn.head_dim

    def forward(self, x, mask_bias, past_k, past_v):
        b = x.shape[0]
        split = (b, -1, self.heads, self.head_dim)
        # Same order of operations as HF's OPTAttention (scale after q_proj) so fp32 results agree bit-closely.
        q = (self.q_proj(x) * self.scaling).reshape(split).transpose(1, 2)
        k = torch.cat([past_k, self.k_proj(x).reshape(split).transpose(1, 2)], dim=2)
        v = torch.cat([past_v, self.v_proj(x).reshape(split).transpose(1, 2)], dim=2)
        probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) + mask_bias, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, -1, self.heads * self.head_dim)
        return self.out_proj(out), k, v


class _Layer(nn.Module):
    def __init__(self, layer: nn.Module, heads: int, pre_norm: bool):
        super().__init__()
        self.self_attn = _Attention(layer.self_attn, heads)
        self.self_attn_layer_norm, self.final_layer_norm = layer.self_attn_layer_norm, layer.final_layer_norm
        self.fc1, self.fc2 = LinearT(layer.fc1), LinearT(layer.fc2)
        self.activation_fn = layer.activation_fn
        self.pre_norm = pre_norm

    def forward(self, x, mask_bias, past_k, past_v):
        present = []

        def attend(h):
            out, k, v = self.self_attn(h, mask_bias, past_k, past_v)
            present.extend((k, v))
            return out

        x = residual(x, self.self_attn_layer_norm, attend, self.pre_norm)
        x = residual(x, self.final_layer_norm, lambda h: self.fc2(self.activation_fn(self.fc1(h))), self.pre_norm)
        return x, *present


class _Decoder(nn.Module):
    def __init__(self, dec: nn.Module, heads: int, pre_norm: bool):
        super().__init__()
        self.embed_tokens, self.embed_positions = dec.embed_tokens, dec.embed_positions
        self.project_in = None if dec.project_in is None else LinearT(dec.project_in)
        self.project_out = None if dec.project_out is None else LinearT(dec.project_out)
        self.final_layer_norm = dec.final_layer_norm
        self.layers = nn.ModuleList(_Layer(layer, heads, pre_norm) for layer in dec.layers)


class OPTForONNX(nn.Module):
    """OPTForCausalLM's math with graph-friendly inputs; parameter paths mirror the HF names (`model.decoder...`)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        cfg = hf_model.config
        if hf_model.lm_head.weight.data_ptr() != hf_model.model.decoder.embed_tokens.weight.data_ptr():
            raise ValueError("this OPT export assumes lm_head is tied to embed_tokens (as in every released OPT)")
        self.config = cfg
        self.num_layers, self.heads = cfg.num_hidden_layers, cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.model = nn.Module()
        self.model.decoder = _Decoder(hf_model.model.decoder, self.heads, cfg.do_layer_norm_before)

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        """past.0.key, past.0.value, past.1.key, ... with P = 0: the inputs of a first (prefill) step."""
        shape = (batch, self.heads, 0, self.head_dim)
        return [torch.zeros(shape) for _ in range(2 * self.num_layers)]

    def forward(self, input_ids, attention_mask, position_ids, *past):
        dec = self.model.decoder
        x = dec.embed_tokens(input_ids)
        if dec.project_in is not None:
            x = dec.project_in(x)
        x = x + F.embedding(position_ids + POSITION_OFFSET, dec.embed_positions.weight)

        # Additive mask [B, 1, S, P+S]: new token s (at cache slot P+s) sees slot t if t <= P+s and t is not padding.
        seq, total = input_ids.shape[1], attention_mask.shape[1]
        slots = torch.arange(total, device=input_ids.device)
        causal = slots[None, :] <= (slots[total - seq:])[:, None]
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
        mask_bias = torch.where(allowed, 0.0, torch.finfo(x.dtype).min)

        present = []
        for i, layer in enumerate(dec.layers):
            x, k, v = layer(x, mask_bias, past[2 * i], past[2 * i + 1])
            present += [k, v]
        if dec.final_layer_norm is not None:
            x = dec.final_layer_norm(x)
        if dec.project_out is not None:
            x = dec.project_out(x)
        # lm_head is tied to embed_tokens: reuse that one tensor. A 2-D F.linear lowers to Gemm(transB=1) reading it
        # as is; `x @ E.t()` would lower to a Transpose that ORT constant-folds into a second (hidden x vocab) copy.
        b, s, h = x.shape
        logits = F.linear(x.reshape(-1, h), dec.embed_tokens.weight).reshape(b, -1, self.config.vocab_size)
        return (logits, *present)


def adaptable_linears(hf_model: nn.Module) -> dict[str, nn.Linear]:
    """HF module path -> nn.Linear for every Linear the export keeps patchable (all but the tied lm_head)."""
    return {name: mod for name, mod in hf_model.named_modules()
            if isinstance(mod, nn.Linear) and name != "lm_head"}


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]
