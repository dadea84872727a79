"""How each backend carries the KV cache: the two forward signatures over the one `DecoderLM`.

`PastPresentDecoder` (ONNX): the cache travels through the graph, any batch, every length dynamic.

    input_ids       int64 [B, S]
    attention_mask  int64 [B, P+S]   1 = real token, 0 = padding, over past and new tokens
    position_ids    int64 [B, S]     0-based positions of the new tokens (an architecture's offset is added inside)
    past.{i}.key / past.{i}.value    float32 [B, kv_heads, P, head_dim]
    -> logits float32 [B, S, vocab], present.{i}.key / present.{i}.value float32 [B, kv_heads, P+S, head_dim]

`StaticCacheDecoder` (ExecuTorch): batch 1, the cache lives in the program as mutable buffers
`k_cache_{i}` / `v_cache_{i}` [max_seq_len, kv_heads, head_dim], written in place with `index_put_` at input_pos.

    tokens    int64 [1, seq]   token ids
    input_pos int64 [seq]      their absolute positions, consecutive: start, start+1, ...
    -> logits float32 [1, seq, vocab]

Attention then looks at all max_seq_len slots under a mask `slot <= position`, so every shape but seq is static.

`CustomOpCacheDecoder` (ExecuTorch, the default where it applies): the same signature and buffers, shaped
[1, max_seq_len, kv_heads, head_dim], but written by ExecuTorch's own LLM kernel `llama::update_cache` and read by
`llama::custom_sdpa`, which attends causally over the slots written so far (GQA included) instead of all of them.
These are the kernels `export_llm` builds on; the runtime loads them first (et_compat.load_llm_kernels).

    >>> from shira_edge.models import load_model
    >>> from shira_edge.exporters.architecture import describe
    >>> hf, _ = load_model("tiny-opt")
    >>> m = StaticCacheDecoder(hf, describe(hf), max_seq_len=16)
    >>> import torch; m(torch.tensor([[2, 7, 9]]), torch.arange(3)).shape
    torch.Size([1, 3, 512])
"""

from __future__ import annotations

import torch

from .architecture import Architecture
from .decoder import DecoderLM, LinearT


class PastPresentDecoder(DecoderLM):
    """ONNX: explicit past/present K/V inputs and outputs; adaptable Linears stored as W^T (`LinearT`), q/k/v
    optionally as one `qkv_proj` MatMul (fuse_qkv)."""

    def __init__(self, hf_model, arch: Architecture, fuse_qkv: bool = False):
        super().__init__(hf_model, arch, linear=LinearT, fuse_qkv=fuse_qkv)

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        """past.0.key, past.0.value, past.1.key, ... with P = 0: the inputs of a first (prefill) step."""
        shape = (batch, self.arch.num_kv_heads, 0, self.arch.head_dim)
        return [torch.zeros(shape) for _ in range(2 * self.arch.num_layers)]

    def io_names(self) -> tuple[list[str], list[str]]:
        n = self.arch.num_layers
        past = [f"past.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        present = [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]

    def forward(self, input_ids, attention_mask, position_ids, *past):
        present = []

        def cache_update(i, k, v):   # past ++ new, which is also what this step returns as present
            present.extend((torch.cat([past[2 * i], k], dim=2), torch.cat([past[2 * i + 1], v], dim=2)))
            return present[-2], present[-1]

        seq, total = input_ids.shape[1], attention_mask.shape[1]
        slots = torch.arange(total, device=input_ids.device)
        valid = attention_mask[:, None, None, :].bool()
        logits = self.run(input_ids, position_ids, slots[total - seq:], slots, cache_update, valid)
        return (logits, *present)


class StaticCacheDecoder(DecoderLM):
    """ExecuTorch: static K/V buffers inside the program, written at input_pos; Linears kept as nn.Linear."""

    def __init__(self, hf_model, arch: Architecture, max_seq_len: int):
        super().__init__(hf_model, arch)
        self.max_seq_len = max_seq_len
        for i in range(arch.num_layers):
            shape = (max_seq_len, arch.num_kv_heads, arch.head_dim)
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        slots = torch.arange(self.max_seq_len, device=tokens.device)
        # ExecuTorch gives mutated buffers no defined initial state: zero the slots no query can see yet, so
        # that garbage (even NaN) there cannot leak through 0 * NaN in the value product.
        written = (slots <= input_pos[-1]).view(-1, 1, 1)

        def cache_update(i, k, v):   # write the new K/V at input_pos, attend over all max_seq_len slots
            k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            k_cache.index_put_((input_pos,), k[0].transpose(0, 1))
            v_cache.index_put_((input_pos,), v[0].transpose(0, 1))
            v_cache = torch.where(written, v_cache, torch.zeros_like(v_cache))
            return k_cache.transpose(0, 1)[None], v_cache.transpose(0, 1)[None]   # [1, kv_heads, max_seq_len, D]

        return self.run(tokens, input_pos[None], input_pos, slots, cache_update)


class CustomOpCacheDecoder(DecoderLM):
    """ExecuTorch with its LLM kernels: K/V written in place by llama::update_cache at input_pos[0], attention by
    llama::custom_sdpa over slots 0..input_pos[-1] only (no mask tensor, no copy of the cache per step)."""

    def __init__(self, hf_model, arch: Architecture, max_seq_len: int):
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers the llama:: ops)

        super().__init__(hf_model, arch)
        if not self.applies(arch, max_seq_len):
            raise ValueError(f"a sliding window below max_seq_len {max_seq_len} needs a mask: use StaticCacheDecoder")
        self.max_seq_len = max_seq_len
        for i in range(arch.num_layers):
            shape = (1, max_seq_len, arch.num_kv_heads, arch.head_dim)
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    @staticmethod
    def applies(arch: Architecture, max_seq_len: int) -> bool:
        """custom_sdpa's causal mode has no window: only where no sliding window can cut inside the cache."""
        return not arch.sliding_layers or arch.sliding_window is None or arch.sliding_window >= max_seq_len

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + tokens.shape[1] <= self.max_seq_len)
        # OPT scales q itself (scale_queries), so the kernel must not scale again
        scale = 1.0 if self.arch.scale_queries else self.arch.attention_scale

        def attend(i, q, k, v):   # q [1, heads, S, D], k/v [1, kv_heads, S, D]; the kernels want [1, S, heads, D]
            k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            torch.ops.llama.update_cache(k.transpose(1, 2), k_cache, start)
            torch.ops.llama.update_cache(v.transpose(1, 2), v_cache, start)
            out = torch.ops.llama.custom_sdpa(q.transpose(1, 2), k_cache, v_cache, start, None, 0.0, True, scale)
            b, s = out.shape[:2]
            return out.reshape(b, s, -1)

        return self.run(tokens, input_pos[None], input_pos, input_pos, None, attend=attend)
