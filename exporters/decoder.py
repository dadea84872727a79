"""The layer math of every supported decoder, written once in torch from an `Architecture`.

`DecoderLM` mirrors the pieces of a Hugging Face causal LM it needs under their HF module paths (so graph scopes and
parameter names say which HF weight they are) and reuses the HF modules themselves: embeddings, LayerNorm/RMSNorm,
activations. Only two things are the backend's (`kv_cache.py`): how K/V reach the cache and come back, and the
`linear` factory for the adaptable Linears (ONNX stores W^T, `LinearT`; ExecuTorch keeps the nn.Linear as is).

    >>> import torch
    >>> from shira_edge.models import load_model
    >>> from shira_edge.exporters.architecture import describe
    >>> from shira_edge.exporters.kv_cache import PastPresentDecoder
    >>> hf, _ = load_model("tiny-opt")
    >>> m = PastPresentDecoder(hf, describe(hf))
    >>> ids = torch.tensor([[2, 7, 9]])
    >>> logits, *present = m(ids, torch.ones_like(ids), torch.arange(3)[None], *m.empty_past(1))
    >>> bool((logits - hf(ids).logits).abs().max() < 1e-5), tuple(present[0].shape)
    (True, (1, 4, 3, 8))
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

from .architecture import Architecture


class LinearT(nn.Module):
    """`nn.Linear` with its weight stored transposed and contiguous: the ONNX initializer is W^T, untouched."""

    WEIGHT_SUFFIX = ".weight_t"  # initializer name = HF module path + this suffix

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


class FusedLinearT(nn.Module):
    """Several `nn.Linear` of one input as one MatMul (q/k/v -> qkv_proj): weight_t = [W1; W2; ...]^T, stored
    contiguous (in, sum of outs), and the output split back. Each W is then a column slice of the one initializer."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.sizes = [lin.out_features for lin in linears]
        self.weight_t = nn.Parameter(torch.cat([lin.weight.detach() for lin in linears]).t().contiguous(),
                                     requires_grad=False)
        biases = [lin.bias.detach() if lin.bias is not None else torch.zeros(lin.out_features) for lin in linears]
        has_bias = any(lin.bias is not None for lin in linears)
        self.bias = nn.Parameter(torch.cat(biases), requires_grad=False) if has_bias else None

    def forward(self, x):
        y = torch.matmul(x, self.weight_t)
        return (y if self.bias is None else y + self.bias).split(self.sizes, dim=-1)


def residual(x, norm, sublayer, pre_norm: bool):
    """One residual sublayer: pre-norm x + f(norm(x)) (Llama, most OPT sizes), or post-norm norm(x + f(x))
    (opt-350m)."""
    return x + sublayer(norm(x)) if pre_norm else norm(x + sublayer(x))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _place(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    *parents, leaf = path.split(".")
    node = root
    for name in parents:
        if name not in node._modules:
            node.add_module(name, nn.Module())
        node = node._modules[name]
    node.add_module(leaf, module)
    return module


class DecoderLM(nn.Module):
    """Token ids + positions + a cache -> logits. Subclasses (kv_cache.py) own the forward signature and the cache:
    they call `run` with the cache slots of the queries and keys and a `cache_update(i, k, v) -> (k_all, v_all)`
    (k, v: layer i's new keys/values [B, kv_heads, S, head_dim]; k_all, v_all: everything attention sees)."""

    def __init__(self, hf_model: nn.Module, arch: Architecture, linear=lambda m: m, fuse_qkv: bool = False):
        super().__init__()
        self.arch, self.config = arch, hf_model.config
        get = hf_model.get_submodule

        def mirror(path, wrap=lambda m: m):
            return _place(self, path, wrap(get(path))) if path else None

        # plain (unregistered) views of the mirrored modules: each is registered once, under its HF path
        self.top = SimpleNamespace(
            embed_tokens=mirror(arch.embed_tokens), embed_positions=mirror(arch.embed_positions),
            final_norm=mirror(arch.final_norm), project_in=mirror(arch.project_in, linear),
            project_out=mirror(arch.project_out, linear),
            lm_head=None if arch.tied_lm_head else mirror(arch.lm_head, linear))
        if arch.positions == "rope":
            rotary = get(arch.rotary)   # its own init fn made inv_freq (llama3 scaling included): use it as is
            self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
            self.rope_scaling = float(rotary.attention_scaling)
        self.fused = {}   # HF Linear path -> (fused module path, its first output column there)
        self.blocks = []
        for i in range(arch.num_layers):
            separate = (arch.o_proj, *arch.mlp) if fuse_qkv else (arch.q_proj, arch.k_proj, arch.v_proj, arch.o_proj,
                                                                  *arch.mlp)
            lin = {p: mirror(arch.layer(i, p), linear) for p in separate}
            qkv = None
            if fuse_qkv:   # one MatMul for q, k and v; its path sits beside them, e.g. ...self_attn.qkv_proj
                paths = [arch.layer(i, p) for p in (arch.q_proj, arch.k_proj, arch.v_proj)]
                qkv = _place(self, paths[0].rsplit(".", 1)[0] + ".qkv_proj", FusedLinearT([get(p) for p in paths]))
                starts = [0, qkv.sizes[0], qkv.sizes[0] + qkv.sizes[1]]
                self.fused.update({p: (paths[0].rsplit(".", 1)[0] + ".qkv_proj", o) for p, o in zip(paths, starts)})
            self.blocks.append(SimpleNamespace(
                qkv=qkv, q=lin.get(arch.q_proj), k=lin.get(arch.k_proj), v=lin.get(arch.v_proj), o=lin[arch.o_proj],
                mlp=[lin[p] for p in arch.mlp],
                attn_norm=mirror(arch.layer(i, arch.attn_norm)), mlp_norm=mirror(arch.layer(i, arch.mlp_norm)),
                act=mirror(arch.layer(i, arch.activation)),
                window=arch.sliding_window if i in arch.sliding_layers else None))

    # ------------------------------------------------------------------ pieces

    def embed(self, input_ids, positions):
        """positions: [B, S] 0-based. Returns (hidden [B, S, H], rope (cos, sin) [B, S, head_dim] or None)."""
        x = self.top.embed_tokens(input_ids)
        if self.top.project_in is not None:
            x = self.top.project_in(x)
        if self.arch.positions == "learned":
            return x + F.embedding(positions + self.arch.position_offset, self.top.embed_positions.weight), None
        # transformers' rotary forward: positions * inv_freq, duplicated, cos/sin times attention_scaling
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return x, (emb.cos() * self.rope_scaling, emb.sin() * self.rope_scaling)

    def attention(self, i: int, x, rope, bias, cache_update, attend=None):
        a, blk = self.arch, self.blocks[i]
        b, s, _ = x.shape
        q, k, v = blk.qkv(x) if blk.qkv is not None else (blk.q(x), blk.k(x), blk.v(x))
        if a.scale_queries:  # OPT's order of operations (scale after q_proj), so fp32 results agree bit-closely
            q = q * a.attention_scale
        q = q.reshape(b, s, a.num_heads, a.head_dim).transpose(1, 2)
        k = k.reshape(b, s, a.num_kv_heads, a.head_dim).transpose(1, 2)
        v = v.reshape(b, s, a.num_kv_heads, a.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if attend is not None:   # the backend's own cache write + attention kernel (kv_cache.CustomOpCacheDecoder)
            return blk.o(attend(i, q, k, v))
        k, v = cache_update(i, k, v)
        groups = a.num_heads // a.num_kv_heads
        if groups > 1:  # grouped-query attention: each KV head serves `groups` query heads (transformers' repeat_kv)
            t = k.shape[2]
            k = k[:, :, None].expand(b, a.num_kv_heads, groups, t, a.head_dim).reshape(b, a.num_heads, t, a.head_dim)
            v = v[:, :, None].expand(b, a.num_kv_heads, groups, t, a.head_dim).reshape(b, a.num_heads, t, a.head_dim)
        scores = torch.matmul(q, k.transpose(2, 3))
        if not a.scale_queries:
            scores = scores * a.attention_scale
        probs = torch.softmax(scores + bias[blk.window], dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, a.num_heads * a.head_dim)
        return blk.o(out)

    def mlp(self, i: int, x):
        blk = self.blocks[i]
        if self.arch.mlp_kind == "relu":
            fc1, fc2 = blk.mlp
            return fc2(blk.act(fc1(x)))
        gate, up, down = blk.mlp
        return down(blk.act(gate(x)) * up(x))

    def _bias(self, q_slots, kv_slots, valid, dtype):
        """{window: additive mask [B or 1, 1, S, T]}: a query at cache slot q sees slot t if t <= q (and t > q - window
        for a sliding layer) and `valid` allows t (padding, unwritten slots)."""
        masks = {}
        for window in {blk.window for blk in self.blocks}:
            allowed = kv_slots[None, :] <= q_slots[:, None]
            if window is not None:
                allowed = allowed & (kv_slots[None, :] > q_slots[:, None] - window)
            allowed = allowed[None, None] if valid is None else allowed[None, None] & valid
            masks[window] = torch.where(allowed, 0.0, torch.finfo(dtype).min)
        return masks

    def run(self, input_ids, positions, q_slots, kv_slots, cache_update, valid=None, attend=None):
        """The whole decoder: logits [B, S, vocab]. positions [B, S]: 0-based token positions; q_slots [S] and
        kv_slots [T]: cache slot indices for the causal mask; valid [B, 1, 1, T] or None: slots that may be seen.
        attend(i, q, k, v) -> [B, S, heads * head_dim], if given, replaces cache_update, the mask and the softmax:
        q [B, heads, S, head_dim], k and v [B, kv_heads, S, head_dim], after RoPE and query scaling."""
        x, rope = self.embed(input_ids, positions)
        bias = None if attend is not None else self._bias(q_slots, kv_slots, valid, x.dtype)
        pre = self.arch.pre_norm
        for i, blk in enumerate(self.blocks):
            x = residual(x, blk.attn_norm, lambda h: self.attention(i, h, rope, bias, cache_update, attend), pre)
            x = residual(x, blk.mlp_norm, lambda h: self.mlp(i, h), pre)
        if self.top.final_norm is not None:
            x = self.top.final_norm(x)
        if self.top.project_out is not None:
            x = self.top.project_out(x)
        if self.top.lm_head is not None:
            return self.top.lm_head(x)
        # Tied lm_head: read the one embedding tensor. A 2-D F.linear lowers to ONNX Gemm(transB=1) reading it as is;
        # `x @ E.t()` would lower to a Transpose that ORT constant-folds into a second (hidden x vocab) copy.
        b, s, h = x.shape
        return F.linear(x.reshape(-1, h), self.top.embed_tokens.weight).reshape(b, s, self.arch.vocab_size)
