"""The output's model card (README.md with Hub front matter). Pure: text in, text out."""
from __future__ import annotations

from .plan import Plan


def model_card(plan: Plan, source_readme: str | None) -> str | None:
    """README.md for the output of ``plan``; ``source_readme`` is the base source's card, whose
    front matter (license) is carried over. None: write no card."""
    return None
