"""On-device stage: onnxruntime, numpy, tokenizers and Pillow only (never torch)."""
