"""Serving an export on Triton Inference Server: the generate protocol, the batch engine, the Python backend
model, the model repository, and the local server."""
