"""Mistral's native checkpoint layout (``consolidated.safetensors`` + ``params.json``): the
config.json equivalent of its params, as transformers' ``convert_mistral_weights_to_hf.py``
builds it. Key renaming and the rotary permutation are the ``mistral`` table of the
``mistral-to-llama`` preset in :mod:`tensorsurgery.rules`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .errors import SourceError

# params.json key -> config.json key.
_PARAMS = {
    "dim": "hidden_size", "n_layers": "num_hidden_layers", "hidden_dim": "intermediate_size",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta", "sliding_window": "sliding_window", "vocab_size": "vocab_size",
    "head_dim": "head_dim",
}
_REQUIRED = ("dim", "n_layers", "hidden_dim", "n_heads", "vocab_size")


def config_from_params(params: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """A Mistral config.json built from ``params`` (read from ``path``).

    Raises:
        SourceError: a required field is missing.
    """
    missing = [k for k in _REQUIRED if k not in params]
    if missing:
        raise SourceError(f"{path}: missing {', '.join(missing)}; a native Mistral checkpoint needs them")
    cfg: dict[str, Any] = {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
        "max_position_embeddings": 32768, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "num_key_value_heads": params["n_heads"], "sliding_window": None,
        "head_dim": params["dim"] // params["n_heads"],
    }
    cfg.update({dst: params[src] for src, dst in _PARAMS.items() if src in params})
    return cfg
