"""Stage 2, what there is: a manifest source (local folder, Hub cache, Mistral native) read into a Checkpoint."""
