"""Export a base model (optionally with an adapter fused in) to ONNX or ExecuTorch plus the manifest.json the
runtime trusts: the library behind `shira-edge export`.

    >>> from shira_edge.exporters.common import Stages
    >>> from shira_edge.export import run_export
    >>> manifest = run_export("tiny-opt", random_init=True, out_dir="out/", stages=Stages())   # doctest: +SKIP

OUT_DIR is built in a temp dir beside it and renamed into place only after the parity check passed, so a failed
export leaves nothing behind. Errors are ExportError (shira_edge.exporters.common) with a one-line reason.
"""

from __future__ import annotations

FORMATS = ("onnx", "executorch")


def run_export(model_name, *, fmt="onnx", adapter=None, targets=(), random_init=False, seed=0, max_seq_len=None,
               atol=None, force=False, out_dir, stages, from_dir=None, fuse_qkv=False) -> dict:
    """The whole export; returns the manifest written to out_dir. Raises ExportError with a one-line reason.

    atol: the parity tolerance; None takes the exporter's own (1e-4, from_genai.GENAI_ATOL for from_dir)."""
    from shira_edge.exporters.common import ExportError, resolve_targets, staged_output_dir
    from shira_edge.exporters.fuse_adapter import check_adapter_path, fuse_adapter
    from shira_edge.exporters.tokenizer_files import export_tokenizer
    from shira_edge.runtime.manifest import write_manifest
    from shira_edge.models import ModelNotAvailable, load_model, resolve

    try:
        resolve(model_name)  # an unknown name fails here, before OUT_DIR is touched or torch is imported
    except ModelNotAvailable as exc:
        raise ExportError(f"--model: {exc}") from None
    if from_dir and (fmt != "onnx" or adapter):
        raise ExportError("--from keeps an existing ONNX graph as it is: it takes neither --format executorch nor "
                          "--adapter (switch adapters at run time instead)")
    if fuse_qkv and (fmt != "onnx" or from_dir):
        raise ExportError("--fuse-qkv shapes the graph shira-edge builds for ONNX: it takes neither --format "
                          "executorch nor --from")
    if adapter:
        check_adapter_path(adapter)
    with staged_output_dir(out_dir, force=force) as tmp:
        with stages("load", model_name + (f" + adapter {adapter}" if adapter else "")):
            try:
                model, info = load_model(model_name, random_init=random_init, seed=seed)
            except ModelNotAvailable as exc:
                raise ExportError(f"--model: {exc}") from None
            fused = None
            if adapter:
                model, fused = fuse_adapter(model, adapter)
            chosen = resolve_targets(model, targets) if targets else None
        try:
            manifest = _export_format(fmt, model, info, tmp, stages=stages, max_seq_len=max_seq_len,
                                      targets=chosen, atol=atol, from_dir=from_dir, fuse_qkv=fuse_qkv)
            manifest.setdefault("files", {}).update(export_tokenizer(info.source, tmp, model.config.vocab_size))
            manifest["export"].update({"adapter": fused, "stage_seconds": dict(stages.seconds)})
            write_manifest(tmp, manifest)
        except OSError as exc:  # disk full, permissions changed under us, ...
            raise ExportError(f"writing {out_dir} failed: {exc}; nothing was written") from None
    return manifest


def _export_format(fmt, model, info, out_dir, *, stages, max_seq_len, targets, atol, from_dir=None,
                   fuse_qkv=False) -> dict:
    """Thin dispatch: each format's exporter writes its files into out_dir and returns the manifest dict."""
    tolerance = {} if atol is None else {"atol": atol}   # unset: the exporter's own default
    if from_dir:
        from shira_edge.exporters.from_genai import export_from_genai

        return export_from_genai(from_dir, model, info, out_dir, stages=stages, targets=targets, **tolerance)
    if fmt == "onnx":
        from shira_edge.exporters.onnx_export import export_onnx

        return export_onnx(model, info, out_dir, stages=stages, max_seq_len=max_seq_len, targets=targets,
                           fuse_qkv=fuse_qkv, **tolerance)
    from shira_edge.exporters.executorch_export import export_executorch

    return export_executorch(model, info, out_dir, stages=stages, max_seq_len=max_seq_len, targets=targets,
                             **tolerance)
