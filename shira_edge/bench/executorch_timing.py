"""Time an ExecuTorch export on this CPU: one 32-token prefill, one decode step, and a reload after patching.

    python -m shira_edge.bench.executorch_timing /tmp/opt125m-et [--repeats 5] [--eager]

A "reload" is what the runtime does after patching weights: load the program again with the patched .ptd (from
a file, or from an in-memory buffer) and load its method, which makes XNNPACK repack the weights; each reload is
timed together with its first decode step. --eager adds the same prefill and decode in PyTorch (the export
module, rebuilt from the manifest's model record) to the same rounds, for a ratio that survives a noisy machine. All cases run
interleaved, round after round, so load from other processes hits them alike; medians are printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def measure(export_dir: Path, repeats: int = 5, prompt_len: int = 32, eager: bool = False) -> dict[str, float]:
    import torch
    from executorch.runtime import Runtime

    from shira_edge.runtime import et_compat
    from shira_edge.runtime.manifest import read_manifest

    manifest = read_manifest(export_dir)
    pte_path = export_dir / manifest["files"]["program"]
    ptd_path = export_dir / manifest["files"]["data"]
    pte, ptd = pte_path.read_bytes(), ptd_path.read_bytes()
    method_name = manifest["io"]["methods"][0]
    prompt_len = min(prompt_len, manifest["io"]["cache"]["max_seq_len"] - 1)
    ids = torch.arange(prompt_len + 1).unsqueeze(0) % 1000 + 3

    decode_args = [ids[:, prompt_len:], torch.tensor([prompt_len])]

    # both reloads end with one decode step: the buffer-loaded module only loads (and repacks) its method on first
    # use, so the step is what makes the two comparable; subtract decode_1 for the load alone
    def reload_from_file():
        method = Runtime.get().load_program(pte_path, data_path=ptd_path).load_method(method_name)
        method.execute(decode_args)
        return method

    def reload_from_buffer():
        module = et_compat.load_from_buffer(pte, ptd)   # both must outlive module: they do here
        module.run_method(method_name, decode_args)

    method = reload_from_file()
    prefill = f"prefill_{prompt_len}"
    cases = [
        (prefill, lambda: method.execute([ids[:, :prompt_len], torch.arange(prompt_len)])),
        ("decode_1", lambda: method.execute(decode_args)),
        ("reload_ptd_file_plus_decode", reload_from_file),
        ("reload_ptd_buffer_plus_decode", reload_from_buffer),
    ]
    if eager:
        wrapper = _eager_wrapper(manifest)
        cases += [
            (f"eager_{prefill}", lambda: wrapper(ids[:, :prompt_len], torch.arange(prompt_len))),
            ("eager_decode_1", lambda: wrapper(*decode_args)),
        ]
    times: dict[str, list[float]] = {key: [] for key, _ in cases}
    for _ in range(repeats):
        for key, fn in cases:
            start = time.perf_counter()
            with torch.no_grad():
                fn()
            times[key].append(time.perf_counter() - start)
    medians = {f"{k}_median_s": round(statistics.median(v), 4) for k, v in times.items()}
    return medians | {"repeats": repeats, "threads": et_compat.threadpool_threads()}


def _eager_wrapper(manifest):
    from shira_edge.exporters.architecture import describe
    from shira_edge.exporters.kv_cache import StaticCacheDecoder
    from shira_edge.models import load_model

    rec = manifest["model"]
    model, _ = load_model(rec["name"], random_init=rec["weights"] == "random-init", seed=rec["seed"] or 0)
    return StaticCacheDecoder(model, describe(model), manifest["io"]["cache"]["max_seq_len"]).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eager", action="store_true", help="also time PyTorch eager in the same rounds")
    args = parser.parse_args()
    print(json.dumps(measure(args.export_dir, args.repeats, eager=args.eager), indent=1))


if __name__ == "__main__":
    main()
