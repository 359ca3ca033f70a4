"""Stage 1, what is asked: a manifest (TOML or mergekit YAML) read into a frozen, checked Manifest."""
