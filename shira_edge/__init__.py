"""shira-edge: Sparse High Rank Adapters (SHiRA) on phones and edge boxes.

The host toolchain: base models (`models`), training (`tuner`), packing a PEFT adapter into a .shira file (`pack`),
exporting (`export`, over the `exporters` package), host benchmarks (`bench`), the quality study (`quality`) and the
CLI (`cli`, `commands`: click only, over those library modules). The on-device runtime is `shira_edge.runtime`
(numpy + onnxruntime/executorch only). docs/architecture.md maps the folders. Importing this package imports no torch.
"""

__version__ = "0.1.0"
