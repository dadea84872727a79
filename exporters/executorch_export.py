"""Export a causal LM (any architecture `architecture.describe` knows) to ExecuTorch (XNNPACK, fp32, static KV cache) with its weights in a separate, patchable .ptd.

    >>> from pathlib import Path
    >>> from shira_edge.models import load_model
    >>> from shira_edge.exporters.common import Stages
    >>> model, info = load_model("tiny-opt")
    >>> manifest = export_executorch(model, info, Path("/tmp/tiny-et"), stages=Stages(), max_seq_len=32)  # doctest: +SKIP
    >>> manifest["files"], manifest["export"]["parity"]["max_abs_diff_full"] < 1e-4                       # doctest: +SKIP
    ({'program': 'model.pte', 'data': 'model.ptd'}, True)

Pipeline: `StaticCacheDecoder` (kv_cache.py) -> `torch.export` (dynamic seq) -> tag every parameter for the external file "model"
-> `to_edge_transform_and_lower(XnnpackPartitioner)` -> `to_executorch(external_constants=...)` -> model.pte +
model.ptd. XNNPACK serializes each Linear weight fp32 in PyTorch (out, in) layout under a named-data key that is the
SHA-256 of its bytes; the mapping below is found from those bytes and then checked byte for byte, never assumed.
The runtime patches a private copy of model.ptd and loads the program again, which makes XNNPACK repack.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from shira_edge.exporters.architecture import cache_spec, check_max_seq_len, describe, token_ids
from shira_edge.exporters.common import ExportError, Stages, apply_targets, manifest_head, tied_weights
from shira_edge.runtime.manifest import weight_entry
from shira_edge.runtime.fingerprint import weight_digest

PROGRAM_FILE = "model.pte"
DATA_TAG = "model"                  # ExecuTorch names the external data file <tag>.ptd
DATA_FILE = f"{DATA_TAG}.ptd"
METHOD = "forward"
PARITY_TOL = 1e-4                   # fp32: max abs logit difference allowed between ExecuTorch and PyTorch
PROMPT_LEN = 16
DEFAULT_MAX_SEQ_LEN = 256           # the static cache is allocated in full: small by default, never above the model's


def export_executorch(model, info, out_dir: Path, *, stages: Stages, max_seq_len: int | None = None,
                      targets=None, atol: float = PARITY_TOL, llm_kernels: bool | None = None,
                      **_ignored) -> dict[str, Any]:
    """Write model.pte + model.ptd into `out_dir`, verify them, and return the manifest dict (not written here).

    `max_seq_len`: the static cache size (default min(256, max_position_embeddings)). `targets`: optional PyTorch
    weight names the caller wants patchable; one that is not a patchable Linear weight of this export raises
    ExportError. `atol`: parity tolerance (max abs logit difference). `llm_kernels`: build the cache on
    ExecuTorch's llama::update_cache / llama::custom_sdpa kernels (`CustomOpCacheDecoder`, the default wherever no
    sliding window falls inside the cache), or on portable ops under a mask (`StaticCacheDecoder`, False). Other
    keyword arguments (meant for other formats) are ignored.
    """
    import torch

    from shira_edge.exporters.kv_cache import CustomOpCacheDecoder, StaticCacheDecoder
    from shira_edge.runtime.et_compat import LLM_KERNELS

    arch = describe(model)
    max_seq_len = check_max_seq_len(arch, max_seq_len, default=DEFAULT_MAX_SEQ_LEN)
    out_dir = Path(out_dir)
    model = model.float().eval()
    applies = CustomOpCacheDecoder.applies(arch, max_seq_len)
    if llm_kernels and not applies:
        raise ExportError(f"llm_kernels=True: this {arch.model_type} model has a sliding window of {arch.sliding_window} inside the "
                          f"{max_seq_len}-slot cache, which llama::custom_sdpa cannot mask; leave llm_kernels unset")
    use_kernels = applies if llm_kernels is None else llm_kernels
    decoder = CustomOpCacheDecoder if use_kernels else StaticCacheDecoder
    wrapper = decoder(model, arch, max_seq_len).eval()
    kernels = list(LLM_KERNELS) if use_kernels else []

    with warnings.catch_warnings():
        # executorch's own meta functions for its LLM kernels call torch._check_is_size, deprecated in torch 2.13:
        # one FutureWarning per layer and pass, about executorch's code, not the user's model
        warnings.filterwarnings("ignore", message="_check_is_size will be removed", category=FutureWarning)
        with stages("trace", f"torch.export, dynamic seq 1..{max_seq_len}"), torch.no_grad():
            ep = _export(wrapper, max_seq_len)
        with stages("lower", "to_edge_transform_and_lower(XNNPACK) -> to_executorch"):
            program = _lower(ep)
    with stages("write", f"{PROGRAM_FILE} + {DATA_FILE}"):
        (out_dir / PROGRAM_FILE).write_bytes(program.buffer)
        program.write_tensor_data_to_file(str(out_dir))
        if not (out_dir / DATA_FILE).is_file():
            raise ExportError(f"ExecuTorch did not write {DATA_FILE} into {out_dir}; the weights would be inside "
                              f"the .pte and not patchable")
    with stages("verify", "weight map byte check, logits parity, cache decode parity"):
        weights = locate_ptd_weights(model, (out_dir / DATA_FILE).read_bytes())
        apply_targets(weights, targets, "ExecuTorch")
        parity = executorch_parity(model, out_dir, max_seq_len, atol)

    cfg = model.config
    return {
        **manifest_head("executorch", info, weights),
        "io": io_spec(cfg, arch, max_seq_len, kernels),
        "files": {"program": PROGRAM_FILE, "data": DATA_FILE},
        "export": {
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": _versions(),
            "partitioner": "XnnpackPartitioner (fp32)",
            "architecture": arch.summary(),
            "bytes": {PROGRAM_FILE: (out_dir / PROGRAM_FILE).stat().st_size,
                      DATA_FILE: (out_dir / DATA_FILE).stat().st_size},
            "parity": parity,
        },
    }


def _export(wrapper, max_seq_len: int):
    """torch.export with a dynamic seq dim, then tag every parameter for the external file: XNNPACK reads the tag
    from node.meta["custom"]["delegate_constant_tag"] when it serializes a delegated constant (what ExecuTorch's
    delegate_external_constants_pass_unlifted sets, without the second export that pass needs)."""
    import torch
    from torch.export import Dim

    seq = Dim("seq", min=1, max=max_seq_len)
    n = min(8, max_seq_len)
    example = (torch.full((1, n), 2, dtype=torch.long), torch.arange(n))
    ep = torch.export.export(wrapper, example, dynamic_shapes=({1: seq}, {0: seq}), strict=True)
    params = ep.graph_signature.inputs_to_parameters
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in params:
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = DATA_TAG
    return ep


def _lower(ep):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    with warnings.catch_warnings():
        # "Mutation on a buffer ... meaningless initial state": expected for the KV cache, which StaticCacheDecoder
        # never reads before writing (it masks and zeroes unwritten slots)
        warnings.filterwarnings("ignore", message="Mutation on a buffer", category=UserWarning)
        # external_constants also sends the non-delegated constants (embeddings, LayerNorms) to the .ptd
        return edge.to_executorch(ExecutorchBackendConfig(external_constants=lambda node: DATA_TAG))


def ptd_index(data: bytes) -> dict[str, tuple[int, int, int]]:
    """{named-data key: (absolute byte offset, nbytes, segment index)} of a .ptd (ExecuTorch flat tensor) file."""
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorHeader

    from shira_edge.runtime.et_compat import deserialize_flat_tensor

    header = FlatTensorHeader.from_bytes(data[8:])
    if not header.is_valid():
        raise ExportError(f"{DATA_FILE}: not an ExecuTorch flat tensor file (bad header)")
    flat = deserialize_flat_tensor(data[: header.flatbuffer_offset + header.flatbuffer_size])
    index = {}
    for named in flat.named_data:
        seg = flat.segments[named.segment_index]
        index[named.key] = (header.segment_base_offset + seg.offset, seg.size, named.segment_index)
    return index


def locate_ptd_weights(model, ptd: bytes) -> list[dict[str, Any]]:
    """One manifest entry per nn.Linear weight of `model`, located in the .ptd bytes and verified byte for byte.

    XNNPACK keys a delegated constant by the SHA-256 of its serialized bytes, so a weight is found under the hash of
    its (out, in) bytes ("as_is") or of its transpose ("transposed"). The data serializer stores identical byte
    blobs once, and identical weights hash to one key, so a weight whose segment other keys or other weights share
    is reported as not patchable (patching it would change those too): that is how OPT's lm_head, tied to
    embed_tokens, comes out.
    """
    import torch

    index = ptd_index(ptd)
    keys_per_segment: dict[int, list[str]] = {}
    for key, (_, _, seg) in index.items():
        keys_per_segment.setdefault(seg, []).append(key)
    tied = tied_weights(model)

    found = []   # (name, weight, layout, key)
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        name = f"{module_name}.weight"
        w = module.weight.detach().float().contiguous().numpy()
        for layout, arr in (("as_is", w), ("transposed", np.ascontiguousarray(w.T))):
            raw = arr.astype("<f4").tobytes()
            key = hashlib.sha256(raw).hexdigest()
            if key in index:
                offset, nbytes, _ = index[key]
                if nbytes != len(raw) or ptd[offset: offset + nbytes] != raw:
                    raise ExportError(f"{name}: bytes at {DATA_FILE}+{offset} ({nbytes} B) differ from the PyTorch "
                                      f"weight")
                found.append((name, w, layout, key))
                break
        else:
            raise ExportError(f"{name}: no tensor in {DATA_FILE} holds this weight's bytes (as is or transposed); "
                              f"XNNPACK may have packed or converted it, so it cannot be patched")

    # Two Linear weights with identical bytes get one key (the hash), and one segment can serve several keys.
    weights_per_segment: dict[int, list[str]] = {}
    for name, _, _, key in found:
        weights_per_segment.setdefault(index[key][2], []).append(name)
    entries = []
    for name, w, layout, key in found:
        offset, nbytes, seg = index[key]
        sharers = sorted({k for k in keys_per_segment[seg] if k != key}
                         | {n for n in weights_per_segment[seg] if n != name})
        note, patchable = None, True
        if name in tied:
            patchable, note = False, f"tied to {tied[name]}; stored once in {DATA_FILE}"
        elif sharers:
            patchable, note = False, (f"its bytes are stored once for {sharers} too (identical data is "
                                      f"deduplicated), so patching it would change those tensors")
        entries.append(weight_entry(name, w.shape, key, layout, DATA_FILE, offset, nbytes, weight_digest(w),
                                    patchable=patchable, note=note))
    return entries


def fixed_prompt(cfg, n: int) -> list[int]:
    """A deterministic prompt: bos, then ids spread over the vocabulary (no tokenizer needed)."""
    bos = 1 if cfg.bos_token_id is None else cfg.bos_token_id
    return [bos] + [(7 + 9973 * i) % (cfg.vocab_size - 3) + 3 for i in range(1, n)]


def executorch_parity(model, out_dir: Path, max_seq_len: int, atol: float = PARITY_TOL) -> dict[str, Any]:
    """Run the written files through the ExecuTorch runtime and compare to the PyTorch model's full forward.

    full: one prefill call over the whole prompt. decode: prefill half, then one token per call, each at its
    position, through the static cache. Both must be within `atol` of PyTorch, else ExportError.
    """
    import torch
    from executorch.runtime import Runtime

    n = min(PROMPT_LEN, max_seq_len)
    ids = torch.tensor([fixed_prompt(model.config, n)])
    with torch.no_grad():
        ref = model(ids).logits

    start = time.perf_counter()
    program = Runtime.get().load_program(out_dir / PROGRAM_FILE, data_path=out_dir / DATA_FILE)
    method = program.load_method(METHOD)
    load_s = time.perf_counter() - start
    full = method.execute([ids, torch.arange(n)])[0]
    half = n // 2
    steps = [method.execute([ids[:, :half], torch.arange(half)])[0]]
    steps += [method.execute([ids[:, p: p + 1], torch.tensor([p])])[0] for p in range(half, n)]
    decode = torch.cat(steps, dim=1)

    full_diff = float((full - ref).abs().max())
    decode_diff = float((decode - ref).abs().max())
    result = {"prompt": f"batch 1 x {n} fixed tokens", "max_abs_diff_full": full_diff,
              "max_abs_diff_decode": decode_diff, "decode": f"prefill {half} then 1 token per call",
              "atol": atol, "load_s": round(load_s, 4)}
    for what, diff in (("prefill", full_diff), ("KV-cache decode", decode_diff)):
        if not diff <= atol:  # also catches NaN
            raise ExportError(f"parity check failed: ExecuTorch {what} logits differ from PyTorch by {diff:.3g} "
                              f"(> {atol}); the export was not written")
    return result


def io_spec(cfg, arch, max_seq_len: int, kernels: list[str]) -> dict[str, Any]:
    return {
        "methods": [METHOD],
        "batch": 1,
        "inputs": [
            {"name": "tokens", "dtype": "int64", "shape": [1, "seq"]},
            {"name": "input_pos", "dtype": "int64", "shape": ["seq"],
             "note": "absolute positions of the tokens, consecutive; 0 starts a new sequence"},
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, "seq", cfg.vocab_size]}],
        "cache": {
            **cache_spec(arch, "static", max_seq_len),
            "seq_range": [1, max_seq_len],
            "layout": "inside the program: per layer k_cache_{i}, v_cache_{i} mutable buffers "
                      f"[{'1, ' if kernels else ''}max_seq_len, num_kv_heads, head_dim], written at input_pos; "
                      "prefill = one call with seq tokens, decode = calls with seq=1; input_pos[-1] must stay "
                      "< max_seq_len",
            # kernels outside ExecuTorch's default set that the program calls: the runtime loads them first
            "kernels": kernels,
        },
        "max_positions": max_seq_len,
        **token_ids(cfg),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {pkg: version(pkg) for pkg in ("torch", "executorch", "transformers")}
