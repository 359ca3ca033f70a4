"""Tensor containers: the safetensors header (read and validated as strictly as the official
reader, encoded) and the dtype table."""
