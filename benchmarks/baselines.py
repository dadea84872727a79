"""The base to beat: what users of each runtime already deploy, timed beside shira-edge's export of the same model.

    pip install -e '.[baselines]'     # onnxruntime-genai==0.18.0 (the builder and its runtime)
    python benchmarks/baselines.py build-genai --model smollm2-135m -o /tmp/smollm2/genai
    python benchmarks/baselines.py build-et-llm --model smollm2-135m -o /tmp/smollm2/et-llm
    shira-edge export --model smollm2-135m -o /tmp/smollm2/onnx
    shira-edge export --model smollm2-135m --format executorch -o /tmp/smollm2/et
    shira-edge export --from /tmp/smollm2/genai --model smollm2-135m -o /tmp/smollm2/from-genai
    python benchmarks/baselines.py time --genai /tmp/smollm2/genai --onnx /tmp/smollm2/onnx \\
        --from-genai /tmp/smollm2/from-genai --et-llm /tmp/smollm2/et-llm --et /tmp/smollm2/et -o /tmp/smollm2/baselines.json

ONNX: (a) onnxruntime-genai's model builder graph, run by onnxruntime_genai itself and by a plain ORT session (ORT
defaults, and the options shira-edge's runtime needs to patch weights in place: prepacking off, EXTENDED); (b)
shira-edge's export in a plain ORT session and through `Runtime.step`. ExecuTorch: (c) the program the 1.5.1 wheel's
`export_llm` makes (smollm2 config, fp32, XNNPACK, KV cache, SDPA op) and (d) shira-edge's .pte. decode = one token
after DECODE_PAST cached ones, prefill_N = N tokens into an empty cache (shira_edge.bench.engines). Every mode of one
backend runs in the same rounds, interleaved, at 1 thread; medians with min/max, and ratios per round.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from shira_edge.bench.engines import PlainModel, kinds, set_threads, shape_of, stepper, token_ids
from shira_edge.bench.stats import interleave, machine_info, paired_ratio, summarize

GENAI_HINT = "onnxruntime-genai is not installed: pip install -e '.[baselines]'  (onnxruntime-genai==0.18.0)"


def hf_source(model: str) -> list[str]:
    """The builder's input for a shira-edge model name: `-i DIR` for a local (or converted GGUF) dir, else `-m ID`."""
    from shira_edge.models import load_model

    _, info = load_model(model)
    return ["-i", info.source] if Path(info.source).is_dir() else ["-m", info.source]


def build_genai(model: str, out: Path) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", *hf_source(model), "-o", str(out),
           "-p", "fp32", "-e", "cpu", "-c", str(out.parent / f".{out.name}-cache")]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


# ------------------------------------------------------------------------------------------------ ExecuTorch export_llm

def meta_checkpoint(hf_model) -> tuple[dict, dict]:
    """(state dict in Meta's llama layout, params.json) for export_llm, from a HF Llama (what the wheel's
    smollm2 convert_weights does through torchtune, which is not installed here): q/k rows go back from HF's
    rotate-half order to Meta's interleaved RoPE order."""
    cfg = hf_model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads

    def unpermute(w, heads):
        return w.view(heads, 2, head_dim // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
    sd = hf_model.state_dict()
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        for hf, meta in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                w = unpermute(w, cfg.num_attention_heads)
            elif hf == "self_attn.k_proj":
                w = unpermute(w, cfg.num_key_value_heads)
            out[f"layers.{i}.{meta}.weight"] = w.contiguous()
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size, "hidden_dim": cfg.intermediate_size,
              "norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_parameters["rope_theta"], "use_scaled_rope": False}
    return out, params


def build_et_llm(model: str, out: Path, max_seq_len: int) -> None:
    import torch

    from shira_edge.models import load_model

    hf, _ = load_model(model)
    out.mkdir(parents=True, exist_ok=True)
    sd, params = meta_checkpoint(hf)
    torch.save(sd, out / "checkpoint.pth")
    (out / "params.json").write_text(json.dumps(params, indent=1))
    cmd = [sys.executable, "-m", "executorch.extension.llm.export.export_llm", "base.model_class=smollm2",
           f"base.checkpoint={out / 'checkpoint.pth'}", f"base.params={out / 'params.json'}",
           "model.use_kv_cache=True", "model.use_sdpa_with_kv_cache=True", "model.enable_dynamic_shape=True",
           "model.dtype_override=fp32", "backend.xnnpack.enabled=True", f"export.max_seq_length={max_seq_len}",
           f"export.max_context_length={max_seq_len}", f"export.output_dir={out}", "export.output_name=model.pte"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=out)   # export_llm saves output_name relative to the working directory
    (out / "checkpoint.pth").unlink()
    print(f"parity vs transformers (prefill of 8 tokens): {et_llm_parity(out / 'model.pte', hf)}")


def et_llm_parity(pte: Path, hf) -> dict:
    import torch

    EtRuntime = et_llm_runtime()

    ids = torch.arange(10, 18, dtype=torch.long)[None]
    method = EtRuntime.get().load_program(pte).load_method("forward")
    got = method.execute([ids, torch.tensor([0], dtype=torch.long)])[0].reshape(-1, hf.config.vocab_size)[-1]
    with torch.no_grad():
        want = hf(ids).logits[0, -1]
    return {"max_abs_logit_diff": float((got - want).abs().max()), "same_argmax": bool(got.argmax() == want.argmax())}


def et_llm_runtime():
    """ExecuTorch's runtime with the kernels export_llm's programs call (llama::custom_sdpa, update_cache)."""
    import torch  # noqa: F401  (the bindings need libtorch first)
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers the llama:: kernels)
    from executorch.runtime import Runtime as EtRuntime

    return EtRuntime


# ------------------------------------------------------------------------------------------------ the engines

class GenaiGraph:
    """The builder's model.onnx in a plain ORT session: input_ids, attention_mask, past_key_values.N.key/value."""

    def __init__(self, genai_dir: Path, threads: int, level: str = "ORT_ENABLE_ALL", prepacking: bool = True):
        import onnxruntime as ort

        dec = json.loads((genai_dir / "genai_config.json").read_text())["model"]["decoder"]
        self.layers, self.kv_heads, self.head = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
        self.vocab = json.loads((genai_dir / "genai_config.json").read_text())["model"]["vocab_size"]
        self.names = dec["inputs"]
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        if not prepacking:
            so.add_session_config_entry("session.disable_prepacking", "1")
        self.sess = ort.InferenceSession(str(genai_dir / dec["filename"]), so, providers=["CPUExecutionProvider"])

    def call(self, kind: str):
        seq, past = shape_of(kind)
        rng = np.random.default_rng(0)
        feeds = {self.names["input_ids"]: token_ids(kind, self.vocab),
                 self.names["attention_mask"]: np.ones((1, past + seq), np.int64)}
        for i in range(self.layers):
            for key in ("past_key_names", "past_value_names"):
                feeds[self.names[key] % i] = rng.standard_normal((1, self.kv_heads, past, self.head), dtype=np.float32)
        return lambda: self.sess.run(["logits"], feeds)


class GenaiRuntime:
    """onnxruntime_genai's own Generator on the builder's folder: what its users deploy."""

    def __init__(self, genai_dir: Path, threads: int):
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise SystemExit(GENAI_HINT) from None
        self.og = og
        config = og.Config(str(genai_dir))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.vocab = json.loads((genai_dir / "genai_config.json").read_text())["model"]["vocab_size"]
        self.gen = None

    def _fresh(self, prefix: np.ndarray | None):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=256, do_sample=False)
        self.gen = self.og.Generator(self.model, params)
        if prefix is not None:
            self.gen.append_tokens(prefix)     # prefill, untimed
            self.gen.generate_next_token()     # picks the token the timed call will run

    def setup(self, kind: str):
        seq, past = shape_of(kind)
        prefix = token_ids("prefill_32", self.vocab)[:, :past] if past else None
        return lambda: self._fresh(prefix)

    def call(self, kind: str):
        seq, past = shape_of(kind)
        if past:
            return lambda: self.gen.generate_next_token()   # one decode step over the past, then argmax
        ids = token_ids(kind, self.vocab)
        return lambda: self.gen.append_tokens(ids)


class EtLlmProgram:
    """export_llm's .pte: forward(tokens, input_pos) with its KV cache inside the program."""

    def __init__(self, pte: Path):
        self.method = et_llm_runtime().get().load_program(pte).load_method("forward")
        self.vocab = json.loads((pte.parent / "params.json").read_text())["vocab_size"]

    def call(self, kind: str):
        import torch

        seq, past = shape_of(kind)
        args = [torch.from_numpy(token_ids(kind, self.vocab)), torch.tensor([past], dtype=torch.long)]
        return lambda: self.method.execute(args)


# ------------------------------------------------------------------------------------------------ timing

def time_onnx(genai: Path | None, onnx: Path | None, samples: int, warmup: int, from_genai: Path | None = None) -> dict:
    from shira_edge.runtime import Runtime
    from shira_edge.runtime.manifest import read_manifest

    engines, manifests = {}, {}
    if genai:
        engines["genai runtime (onnxruntime_genai)"] = GenaiRuntime(genai, 1)
        engines["genai graph, ORT defaults"] = GenaiGraph(genai, 1)
        engines["genai graph, patchable options"] = GenaiGraph(genai, 1, "ORT_ENABLE_EXTENDED", prepacking=False)
    if onnx:
        manifest = read_manifest(onnx)
        engines["shira-edge graph, ORT defaults"] = PlainModel("onnxruntime", onnx, manifest, 1)
        engines["shira-edge graph, its level"] = PlainModel("onnxruntime", onnx, manifest, 1,
                                                            level=manifest["files"]["graph_optimization_level"])
        engines["shira-edge Runtime, step()"] = Runtime(onnx, threads=1)
        manifests["shira-edge Runtime, step()"] = manifest
    if from_genai:   # the builder's graph behind shira-edge's runtime: `export --from` output
        manifests["genai graph, Runtime step() (export --from)"] = read_manifest(from_genai)
        engines["genai graph, Runtime step() (export --from)"] = Runtime(from_genai, threads=1)
    results = {}
    for kind in kinds():
        modes, setup = {}, {}
        for name, engine in engines.items():
            if isinstance(engine, Runtime):
                modes[name] = stepper(engine, manifests[name], kind)
            else:
                modes[name] = engine.call(kind)
            if isinstance(engine, GenaiRuntime):
                setup[name] = engine.setup(kind)
        results[kind] = _summaries(interleave(modes, samples=samples, warmup=warmup, setup=setup))
    return results


def time_et(et_llm: Path | None, ets: list[Path], samples: int, warmup: int) -> dict:
    """export_llm's program, then each of our .pte through the Python bindings (as export_llm's is run), and the
    first one through shira-edge's Runtime (the native runner, packed in place)."""
    from shira_edge.runtime import Runtime
    from shira_edge.runtime.manifest import read_manifest

    et_llm_runtime()   # loads the bindings, so the pool can be sized before any program exists:
    set_threads(1)     # resetting it under a loaded XNNPACK program crashes (SIGSEGV) on the next call
    engines, steps = {}, {}
    if et_llm:
        engines["export_llm .pte (XNNPACK)"] = EtLlmProgram(et_llm / "model.pte")
    for et in ets:
        manifest = read_manifest(et)
        carrier = "LLM kernels" if manifest["io"]["cache"].get("kernels") else "masked cache"
        engines[f"shira-edge .pte, {carrier} ({et.name})"] = PlainModel("executorch", et, manifest, 1)
    if ets:
        manifest = read_manifest(ets[0])
        steps[f"shira-edge Runtime, step() ({ets[0].name})"] = (Runtime(ets[0], threads=1), manifest)
    results = {}
    for kind in kinds():
        modes = {n: e.call(kind) for n, e in engines.items()}
        modes.update({n: stepper(rt, manifest, kind) for n, (rt, manifest) in steps.items()})
        results[kind] = _summaries(interleave(modes, samples=samples, warmup=warmup))
    return results


def _summaries(samples: dict[str, list[float]]) -> dict:
    # "<mode>.<part>" lists are sub-timings (stats.interleave); mode names themselves may hold dots
    names = [n for n in samples if not any(n.startswith(m + ".") for m in samples if m != n)]
    out = {n: summarize(samples[n]) for n in names}
    for n in names[1:]:
        out[n]["ratio_to_first"] = paired_ratio(samples[n], samples[names[0]])
    return out


def markdown(results: dict) -> str:
    lines = []
    for backend, table in results.items():
        if not table:
            continue
        lines += [f"\n{backend}: median ms (min-max); x = per-round ratio to the first row, median (min-max)\n",
                  "| engine | " + " | ".join(table) + " |", "|---" * (len(table) + 1) + "|"]
        for name in next(iter(table.values())):
            cells = []
            for kind in table:
                s = table[kind][name]
                cell = f"{s['median'] * 1e3:.1f} ({s['min'] * 1e3:.1f}-{s['max'] * 1e3:.1f})"
                if "ratio_to_first" in s:
                    r = s["ratio_to_first"]
                    cell += f", x{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"
                cells.append(cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("build-genai", help="run onnxruntime-genai's model builder (fp32, cpu)")
    e = sub.add_parser("build-et-llm", help="run the ExecuTorch wheel's export_llm (smollm2, fp32, XNNPACK)")
    for p in (g, e):
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("-o", "--out", type=Path, required=True)
    e.add_argument("--max-seq-len", type=int, default=256)
    t = sub.add_parser("time", help="time the given folders, interleaved, 1 thread")
    for flag in ("--genai", "--onnx", "--from-genai", "--et-llm"):
        t.add_argument(flag, type=Path)
    t.add_argument("--et", type=Path, action="append", default=[],
                   help="a shira-edge ExecuTorch export (repeat to compare several; the first also runs through "
                        "the Runtime)")
    t.add_argument("--samples", type=int, default=15)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("-o", "--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    if args.cmd == "build-genai":
        build_genai(args.model, args.out)
    elif args.cmd == "build-et-llm":
        build_et_llm(args.model, args.out, args.max_seq_len)
    else:
        onnx = args.genai or args.onnx or args.from_genai
        results = {"onnx": time_onnx(args.genai, args.onnx, args.samples, args.warmup, args.from_genai) if onnx
                   else {},
                   "executorch": time_et(args.et_llm, args.et, args.samples, args.warmup) if args.et_llm or args.et
                   else {}}
        print(markdown(results))
        if args.out:
            args.out.write_text(json.dumps({"machine": machine_info(), "argv": sys.argv, "results": results},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
