"""Zero-shot text templates: the named sets (``bioclip2``, ``openai``, ``simple``, ``none``) and their resolver."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _openai_templates() -> list[str]:
    # open_clip stores them as lambdas; formatting with "{}" turns them back into str.format templates
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def _bioclip2_templates() -> list[str]:
    # the reference list starts with the training caption, then the 80 (order does not change the mean)
    return ["a photo of {}."] + _openai_templates()


TEMPLATE_SETS: dict[str, Any] = {
    "bioclip2": _bioclip2_templates,  # 81 templates (BioCLIP 2 reference evaluation)
    "openai": _openai_templates,  # 80 templates (CLIP)
    "simple": lambda: ["a photo of {}."],  # the single template BioCLIP trains with
    "none": lambda: ["{}"],
}
DEFAULT_TEMPLATES = "bioclip2"


def resolve_templates(templates: str | Sequence[str] | None) -> list[str]:
    """A template set name (``bioclip2``, ``openai``, ``simple``, ``none``) or an explicit list of ``{}`` format strings."""
    if templates is None:
        templates = DEFAULT_TEMPLATES
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return list(TEMPLATE_SETS[templates]())
        if "{}" in templates:
            return [templates]
        raise ValueError(f"templates={templates!r}: not one of {sorted(TEMPLATE_SETS)} and has no '{{}}' placeholder")
    out = list(templates)
    if not out:
        raise ValueError("templates is empty")
    bad = [t for t in out if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise ValueError(f"templates must be str.format strings with one '{{}}' placeholder; bad: {bad[:3]}")
    return out
