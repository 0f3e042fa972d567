"""Stage 4, running a graph: the Decoder protocol every runner implements, the KV cache, ONNX Runtime."""
