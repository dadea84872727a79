"""The on-device runtime: numpy plus onnxruntime or executorch, never torch, transformers or peft."""
