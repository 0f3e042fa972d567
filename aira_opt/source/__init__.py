"""Stage 1, the source: what `--model SPEC` names and how it loads, the prompt format, the bundled texts."""
