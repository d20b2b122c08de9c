"""LensNet reference module, checkpoint import and ONNX export (needs the `export` extra: torch, onnx)."""
