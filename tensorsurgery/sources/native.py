"""Mistral's native checkpoint layout (``consolidated.safetensors`` or ``consolidated.NN.safetensors``
plus ``params.json``): the config.json its params mean, as transformers'
``convert_mistral_weights_to_hf.py`` builds it, checked against the tensors.

Key renaming and the rotary row permutation are data: the ``mistral`` key table of the
``mistral-to-llama`` preset in :mod:`tensorsurgery.families.rules`, also used with no preset (the output is
then the Hugging Face MistralForCausalLM, as the script writes it). The permutation
splits q rows into ``num_attention_heads`` heads and k rows into ``num_key_value_heads`` heads, so
its per-head size is ``rows / heads``, which :func:`config_from_params` checks equals ``head_dim``
(``n_heads * head_dim`` may differ from ``dim``, as in Mistral-Nemo).
"""
from __future__ import annotations

import re
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from tensorsurgery.errors import SourceError
from tensorsurgery.formats.safetensors import TensorEntry

# params.json key -> config.json key; the rest of the config is the defaults below.
_PARAMS = {
    "dim": "hidden_size", "n_layers": "num_hidden_layers", "hidden_dim": "intermediate_size",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta", "sliding_window": "sliding_window", "vocab_size": "vocab_size",
    "head_dim": "head_dim", "max_seq_len": "max_position_embeddings",
}
_INTS = ("dim", "n_layers", "hidden_dim", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "max_seq_len")
_REQUIRED = ("dim", "n_layers", "hidden_dim", "n_heads")
# What transformers' script (and MistralConfig) puts where params.json says nothing. Its
# --max_position_embeddings defaults to 32768 when params.json has no max_seq_len.
_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "model_type": "mistral", "hidden_act": "silu",
    "max_position_embeddings": 32768, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "sliding_window": None,
    "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
})
# params.json fields of checkpoints that are not a plain Mistral decoder.
_UNSUPPORTED = {"moe": "a mixture of experts (Mixtral)", "vision_encoder": "a vision model (Pixtral)"}
_TORCH_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
_ATTENTION = re.compile(r"layers\.(\d+)\.attention\.w([qk])\.weight")


def config_from_params(params: Mapping[str, Any], path: Path,
                       tensors: Mapping[str, TensorEntry] | None = None) -> dict[str, Any]:
    """The Hugging Face Mistral config.json equivalent to ``params`` (read from ``path``).

    Args:
        params: the parsed params.json.
        path: where it was read, for messages.
        tensors: the checkpoint's tensors by name; when given, ``vocab_size`` may come from the
            embedding, ``tie_word_embeddings`` and ``torch_dtype`` follow the weights, and q/k row
            counts are checked against ``n_heads``/``n_kv_heads`` times ``head_dim``.

    Raises:
        SourceError: a required field is missing or not a positive integer, the checkpoint is a
            kind this layout does not cover (mixture of experts, vision), or the attention
            tensors do not match the head counts.

    Example:
        >>> cfg = config_from_params({"dim": 4096, "n_layers": 32, "hidden_dim": 14336, "n_heads": 32,
        ...                           "n_kv_heads": 8, "vocab_size": 32000}, Path("params.json"))
        >>> cfg["head_dim"], cfg["num_key_value_heads"], cfg["max_position_embeddings"]
        (128, 8, 32768)
    """
    for key, what in _UNSUPPORTED.items():
        if params.get(key):
            raise SourceError(f"{path}: has {key!r}: this is {what}; only dense Mistral decoders are supported")
    missing = [k for k in _REQUIRED + (() if tensors else ("vocab_size",)) if k not in params]
    if missing:
        raise SourceError(f"{path}: missing {', '.join(missing)}; a native Mistral checkpoint needs them")
    for key in _INTS:
        value = params.get(key)
        if key in params and (type(value) is not int or value <= 0):
            raise SourceError(f"{path}: {key} must be a positive integer, found {value!r}")
    cfg = dict(_DEFAULTS, architectures=["MistralForCausalLM"], num_key_value_heads=params["n_heads"],
               head_dim=params["dim"] // params["n_heads"])
    cfg.update({dst: params[src] for src, dst in _PARAMS.items() if params.get(src) is not None})
    if cfg["sliding_window"] is not None:  # a string in some params.json, as the script notes
        try:
            cfg["sliding_window"] = int(cfg["sliding_window"])
        except (TypeError, ValueError):
            raise SourceError(f"{path}: sliding_window must be an integer, found "
                              f"{params['sliding_window']!r}") from None
    if tensors:
        _from_tensors(cfg, params, tensors, path)
    return cfg


def _from_tensors(cfg: dict[str, Any], params: Mapping[str, Any], tensors: Mapping[str, TensorEntry],
                  path: Path) -> None:
    embedding = tensors.get("tok_embeddings.weight")
    if "vocab_size" not in params:
        if embedding is None or len(embedding.shape) != 2:
            raise SourceError(f"{path}: missing vocab_size and no 2-D tok_embeddings.weight to take it from")
        cfg["vocab_size"] = embedding.shape[0]
    cfg["tie_word_embeddings"] = "output.weight" not in tensors
    dtypes = {e.dtype for e in tensors.values()}
    if len(dtypes) == 1 and next(iter(dtypes)) in _TORCH_DTYPES:
        cfg["torch_dtype"] = _TORCH_DTYPES[dtypes.pop()]
    heads = {"q": ("n_heads", cfg["num_attention_heads"]), "k": ("n_kv_heads", cfg["num_key_value_heads"])}
    for name, entry in sorted(tensors.items()):
        m = _ATTENTION.fullmatch(name)
        if not m:
            continue
        field, n = heads[m.group(2)]
        rows = n * cfg["head_dim"]
        if entry.shape != (rows, cfg["hidden_size"]):
            raise SourceError(f"{path}: {name} has shape {list(entry.shape)} but {field} * head_dim x dim is "
                              f"[{rows}, {cfg['hidden_size']}] ({field} = {n}, head_dim = {cfg['head_dim']}); "
                              f"params.json does not describe these weights (set head_dim if it differs "
                              f"from dim / n_heads)")
