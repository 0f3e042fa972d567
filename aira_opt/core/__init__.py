"""The ground every stage stands on: errors, artifact folders and manifests, the ONNX I/O contract, the
numerics that compare logits, progress and tables. Imports nothing else of aira_opt."""
