"""Stage 6b, `bench`: every backend measured the same way, side by side."""
