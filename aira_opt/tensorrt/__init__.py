"""TensorRT, its own part: the build plan and pre-flight (no TensorRT needed) and the thin TensorRT 11 layer
that builds and runs engines behind the same Decoder protocol as ONNX Runtime."""
