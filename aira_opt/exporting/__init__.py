"""Stage 2, PyTorch -> ONNX: the exporter, the files that travel with the graph, and what makes the folder
usable by other runtimes."""
