"""Exporters: write a base model (optionally with a SHiRA adapter fused) to ONNX or ExecuTorch, plus the
manifest.json that tells the runtime where every adaptable weight lives. Host-side code: uses torch."""
