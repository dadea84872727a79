"""shira-edge: Sparse High Rank Adapters (SHiRA) on phones and edge boxes.

Host toolchain (this package: models, tuner, .shira packing, CLI, bench), exporters (`shira_edge.exporters`)
and the on-device runtime (`shira_edge.runtime`, numpy + onnxruntime/executorch only). Importing this package
imports no torch.
"""

__version__ = "0.1.0"
