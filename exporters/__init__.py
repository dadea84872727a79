"""Exporters: write a base model (optionally with a SHiRA adapter fused) to ONNX or ExecuTorch, plus the
manifest.json that tells the runtime where every adaptable weight lives. Host-side code: uses torch.

What an architecture is (architecture.py, one arch_*.py per family) is kept apart from how a backend carries the KV
cache (kv_cache.py); the layer math is written once (decoder.py). docs/exporters.md says how to add an architecture."""
