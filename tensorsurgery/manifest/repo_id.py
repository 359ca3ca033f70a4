"""How the Hugging Face Hub spells a model repo id, in one place."""
from __future__ import annotations

import re

#: ``org/name``: what a source or a card's ``base_model`` names.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
#: ``org/name`` or a bare ``name`` (in the token owner's namespace): what a push may target.
_PUSH_TARGET = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")


def is_repo_id(text: str) -> bool:
    """True when ``text`` is spelled like a Hub repo id (``org/name``), not like a path."""
    return _REPO_ID.fullmatch(text) is not None and ".." not in text


def is_push_target(text: str) -> bool:
    """True when ``text`` can name a repo to push to (``org/name`` or ``name``)."""
    return _PUSH_TARGET.fullmatch(text) is not None and ".." not in text
