"""Stage 4, writing: the expected bytes of every output file, the pump that streams them, the
atomic temporary folder, the provenance record."""
