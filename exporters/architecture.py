"""What a decoder-only architecture is, written down once and independent of any backend.

An `Architecture` says where the Hugging Face model keeps each piece (module paths) and which variant of each
piece it uses: learned or rotary positions, LayerNorm or RMSNorm (the HF norm modules are reused as they are),
where the attention scale is applied, a ReLU or SwiGLU MLP, grouped-query heads, a sliding window, a tied lm_head.
`decoder.py` turns it into one torch module, `kv_cache.py` says how each backend carries the cache.

Each architecture is one small module (`arch_opt.py`, `arch_llama.py`, ...) with a `describe(hf_model)` function
registered for its `model_type`s:

    >>> from shira_edge.models import load_model
    >>> arch = describe(load_model("tiny-opt")[0])
    >>> arch.model_type, arch.num_heads, arch.num_kv_heads, arch.positions, arch.tied_lm_head
    ('opt', 4, 4, 'learned', True)
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Callable

from .common import ExportError

# model_type -> the module that describes it. Adding an architecture = one module + one line here + one test row.
MODULES = {"opt": "arch_opt", "llama": "arch_llama", "mistral": "arch_mistral", "qwen2": "arch_qwen2"}


@dataclass(frozen=True)
class Architecture:
    model_type: str
    num_layers: int
    num_heads: int                 # query heads
    num_kv_heads: int              # heads in the KV cache (< num_heads under grouped-query attention)
    head_dim: int
    vocab_size: int
    max_positions: int             # the model's max_position_embeddings
    # module paths in the HF model; a layer's pieces are relative to f"{layers}.{i}"
    embed_tokens: str
    layers: str
    final_norm: str | None
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    attn_norm: str
    mlp_norm: str
    mlp: tuple[str, ...]           # ("fc1", "fc2") for "relu"; ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    mlp_kind: str                  # "relu": fc2(act(fc1 x)); "swiglu": down(act(gate x) * up x)
    activation: str                # the layer's activation module (reused: OPT's ReLU, Llama's SiLU)
    attention_scale: float
    scale_queries: bool            # True: q_proj(x) * scale before q.k (OPT); False: (q.k) * scale (Llama)
    positions: str                 # "learned" (an embedding table) or "rope"
    embed_positions: str | None = None
    position_offset: int = 0       # OPT stores position p at row p + 2
    rotary: str | None = None      # the HF rotary embedding module (its inv_freq and scaling are used as is)
    rope_type: str | None = None
    pre_norm: bool = True          # False: OPT-350m's post-norm residuals
    project_in: str | None = None  # OPT-350m's word_embed_proj_dim != hidden_size
    project_out: str | None = None
    tied_lm_head: bool = True
    lm_head: str = "lm_head"
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = field(default_factory=tuple)

    def layer(self, i: int, piece: str) -> str:
        return f"{self.layers}.{i}.{piece}"

    def linears(self, i: int) -> tuple[str, ...]:
        """The HF module paths of layer i's Linear modules, in call order."""
        return tuple(self.layer(i, p) for p in (self.q_proj, self.k_proj, self.v_proj, self.o_proj, *self.mlp))

    def summary(self) -> dict:
        """What the manifest records about the architecture (export.architecture)."""
        keep = ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "max_positions",
                "mlp_kind", "positions", "rope_type", "pre_norm", "tied_lm_head", "sliding_window")
        return {k: v for k, v in asdict(self).items() if k in keep}


def supported() -> list[str]:
    return sorted(MODULES)


def describe(hf_model) -> Architecture:
    """The `Architecture` of a transformers causal LM, or one ExportError naming it and the supported list."""
    model_type = getattr(hf_model.config, "model_type", None)
    if model_type not in MODULES:
        archs = getattr(hf_model.config, "architectures", None) or [type(hf_model).__name__]
        raise ExportError(f"architecture {archs[0]} (model_type {model_type!r}) is not supported by the exporters; "
                          f"supported model_types: {', '.join(supported())} (see docs/exporters.md, 'Adding an "
                          f"architecture')")
    module = importlib.import_module(f"{__package__}.{MODULES[model_type]}")
    describe_fn: Callable = module.describe
    return describe_fn(hf_model)


def heads_of(hf_model, attn_path: str) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) from a config, the way transformers' attention modules derive them."""
    cfg = hf_model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = hf_model.get_submodule(attn_path).head_dim
    return heads, kv_heads, int(head_dim)


def check_max_seq_len(arch: Architecture, max_seq_len: int | None, default: int) -> int:
    """`--max-seq-len`, defaulted to fit the model: never above its max_position_embeddings."""
    if max_seq_len is None:
        return min(default, arch.max_positions)
    if not 2 <= max_seq_len <= arch.max_positions:
        raise ExportError(f"--max-seq-len {max_seq_len} must be in 2..{arch.max_positions} (this {arch.model_type} "
                          f"model's max_position_embeddings)")
    return max_seq_len


def cache_spec(arch: Architecture, kind: str, max_seq_len: int) -> dict:
    """manifest io.cache keys both backends write with the same meaning (backends add their own next to them)."""
    return {"kind": kind, "num_layers": arch.num_layers,
            "num_heads": arch.num_kv_heads,          # heads in the cache: the KV heads under grouped-query attention
            "num_attention_heads": arch.num_heads, "head_dim": arch.head_dim, "max_seq_len": max_seq_len}


def token_ids(cfg) -> dict:
    """manifest io keys for the special tokens, from the model config."""
    return {"vocab_size": cfg.vocab_size, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id}
