"""Stage 3, ONNX -> ONNX: the precision variants (one record each), the CPU fusion, validation against
PyTorch, and the one export pipeline that ties stage 2 and 3 into a finished folder."""
