"""Hugging Face Hub sources, through huggingface_hub's cache (honours HF_HOME, HF_HUB_OFFLINE
and HF_TOKEN)."""
from __future__ import annotations

from .errors import SourceError


def resolve_hub_source(repo_id: str, revision: str | None):
    """Resolve ``repo_id`` at ``revision`` to a local snapshot and load it.

    Raises:
        SourceError: the repo cannot be resolved (offline and not cached, unknown repo).
    """
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise SourceError(f"{repo_id}: huggingface_hub is needed for hub sources ({e})") from e
    from .source import load_checkpoint
    try:
        root = snapshot_download(repo_id, revision=revision,
                                 allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
    except LocalEntryNotFoundError:
        raise SourceError(f"{repo_id}: not in the local Hugging Face cache and the Hub is unreachable "
                          f"(offline?); download it first or pass --source PATH") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise SourceError(f"{repo_id}: cannot resolve on the Hugging Face Hub: {e}") from None
    from pathlib import Path
    revision_hash = Path(root).name
    return load_checkpoint(root, revision=revision_hash, repo_id=repo_id)
