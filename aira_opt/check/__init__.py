"""Stage 6a, `check`: parity of an export with its PyTorch source."""
