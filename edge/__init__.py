"""The edge runtime: onnxruntime + numpy + requests, nothing heavier."""
