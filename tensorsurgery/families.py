"""Model-family knowledge as data: where a family's decoder layers live, which config key counts
them, and which config fields describe layers one by one. One :class:`Family` per family, looked
up from config.json by ``model_type`` (never by if/elif); a model no entry knows uses
:data:`GENERIC`, today's rules for Llama-like decoders.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from .layers import GENERIC_LAYERS, LayerScheme


@dataclass(frozen=True, slots=True)
class Family:
    """What planning needs to know of one model family.

    ``layers`` finds decoder layers in tensor names; ``config_path`` is where the decoder's config
    sits in config.json (``()`` top level, ``("text_config",)`` for multimodal models) and
    ``count_key`` the key there that counts its layers.
    """

    name: str
    model_types: tuple[str, ...] = ()
    layers: LayerScheme = GENERIC_LAYERS
    config_path: tuple[str, ...] = ()
    count_key: str = "num_hidden_layers"

    def text_config(self, config: Mapping[str, Any]) -> Mapping[str, Any]:
        """The part of ``config`` that describes the decoder (``{}`` when it is missing)."""
        for key in self.config_path:
            config = config.get(key) if isinstance(config.get(key), dict) else {}
        return config

    def declared_layers(self, config: Mapping[str, Any]) -> Any:
        """The layer count config.json declares (None when absent; not checked to be an int)."""
        return self.text_config(config).get(self.count_key)

    @property
    def count_path(self) -> str:
        """The dotted config.json path of the layer count, for messages."""
        return ".".join((*self.config_path, self.count_key))


GENERIC = Family("generic")

FAMILIES: tuple[Family, ...] = ()

_BY_MODEL_TYPE: Mapping[str, Family] = MappingProxyType({t: f for f in FAMILIES for t in f.model_types})


def family_of(config: Mapping[str, Any]) -> Family:
    """The family ``config`` (a config.json) belongs to; :data:`GENERIC` when no entry knows it."""
    model_type = config.get("model_type")
    return _BY_MODEL_TYPE.get(model_type, GENERIC) if isinstance(model_type, str) else GENERIC
