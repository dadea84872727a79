"""Export a model, pack two SHiRA adapters, and switch between them while generating, printing the switch times.

    python examples/switch_adapters.py                                   # tiny-opt: seconds
    python examples/switch_adapters.py --model opt-125m --random-init    # the real size (export takes minutes)
    python examples/switch_adapters.py --format executorch               # the ExecuTorch backend
    python examples/switch_adapters.py --model opt-125m --random-init --export demo-out/onnx   # reuse an export

The adapters are PEFT SHiRA adapters (`ShiraConfig(init_weights=False)`: random values on a random mask, untrained),
saved by PEFT and packed by `shira-edge pack`, exactly as a trained one would be. Export and pack run the real
`shira-edge` commands, printed first so they can be rerun by hand.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def shira_edge(*args: str) -> None:
    print(f"$ shira-edge {shlex.join(args)}", flush=True)
    exe = Path(sysconfig.get_path("scripts")) / "shira-edge"
    subprocess.run([str(exe), *args], check=True, stdout=subprocess.DEVNULL)


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def peft_adapter(model: str, random_init: bool, seed: int, r: int, out: Path) -> Path:
    """A PEFT SHiRA adapter directory (untrained: init_weights=False gives random values)."""
    import torch
    from peft import ShiraConfig, get_peft_model

    from shira_edge.models import load_model

    base, _ = load_model(model, random_init=random_init)
    torch.manual_seed(seed)
    get_peft_model(base, ShiraConfig(r=r, target_modules=TARGETS, init_weights=False, random_seed=seed)) \
        .save_pretrained(out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-opt")
    ap.add_argument("--random-init", action="store_true", help="seeded random base weights (offline opt-125m)")
    ap.add_argument("--format", choices=["onnx", "executorch"], default="onnx")
    ap.add_argument("--policy", default="auto",
                    help="auto | instant | packed: what to do if the packed-in-place switch is unavailable "
                         "(see docs/runtime.md)")
    ap.add_argument("--r", type=int, default=4, help="SHiRA r: r*(in+out) entries per weight (r=4: ~1%% at 768)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--work", type=Path, help="where to write the export and adapters (default: a temp dir)")
    ap.add_argument("--export", type=Path, help="use this existing export dir (e.g. make demo's) instead of exporting")
    args = ap.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="shira-switch-"))
    init = ["--random-init"] if args.random_init else []
    export = args.export or work / f"export-{args.format}"
    if not (export / "manifest.json").is_file():
        shira_edge("export", "--model", args.model, *init, "--format", args.format, "-o", str(export), "--force")
    adapters = {}
    for name, seed in (("a", 1), ("b", 2)):
        path = work / f"{name}.shira"
        if not path.is_file():
            peft_dir = peft_adapter(args.model, args.random_init, seed, args.r, work / f"peft-{name}")
            shira_edge("pack", str(peft_dir), "-o", str(path), "--model", args.model, *init)
        adapters[name] = path

    from shira_edge.runtime import Runtime

    prompt = np.array([[2, 100, 200, 300, 400]])
    with Runtime(export, policy=args.policy) as rt:
        rt.wait_ready()
        base = rt.weight_buffer.copy()
        a, b = adapters["a"], adapters["b"]

        def pass_after_generation() -> float:
            # The base reference is measured like each row below: a prompt pass right after a generation.
            rt.generate(prompt, max_new_tokens=args.tokens)
            return timed(rt.step, prompt)

        base_call = sorted(pass_after_generation() for _ in range(5))[2]
        print(f"\n{rt}")
        if rt.switch_fallback_reason:
            print(f"(not packed-in-place: {rt.switch_fallback_reason})")
        print(f"{'switch to':<22}{'live after':>12}{'(scatter)':>11}{'full speed after':>18}{'1st run vs base':>17}"
              f"   greedy tokens")
        for label, target, scales in [("base", None, None), ("a", a, None), ("b", b, None), ("a+0.5*b", [a, b], [1, .5]),
                                      ("a", a, None), ("b", b, None), ("base", None, None)]:
            t = time.perf_counter()
            rt.switch(target, scales)
            live = time.perf_counter() - t
            rt.wait_ready()
            ready = time.perf_counter() - t
            first = timed(rt.step, prompt)     # the first run after the switch: at full speed already?
            tokens = rt.generate(prompt, max_new_tokens=args.tokens)[0, prompt.shape[1]:]
            print(f"{label:<22}{live * 1e3:>10.1f}ms{rt.last_switch['scatter_s'] * 1e3:>9.2f}ms"
                  f"{ready * 1e3:>16.1f}ms{first / base_call:>16.2f}x   "
                  f"{' '.join(map(str, tokens[:12]))}{' ...' if len(tokens) > 12 else ''}")
        print(f"\nback to base, every weight buffer bit-identical: {rt.weight_buffer.tobytes() == base.tobytes()}")
        print("(the first switch to an adapter includes reading, validating and mapping it; later ones are cached)")
    print(f"artifacts in {work}")


if __name__ == "__main__":
    sys.exit(main())
