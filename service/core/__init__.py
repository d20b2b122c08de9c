"""Pure cores of the request path: numpy and C only (no FastAPI, ONNX Runtime or Prometheus)."""
