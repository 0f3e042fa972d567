"""aira-opt: take Aira-2-1B1 (and Llama-family models like it) from PyTorch to verified ONNX Runtime and TensorRT."""

__version__ = "0.1.0"
