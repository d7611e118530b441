"""The cloud side: training, export, quantization, registry, precompute and the HTTP API."""
