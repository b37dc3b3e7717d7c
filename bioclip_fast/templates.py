"""Zero-shot text templates: the named sets (``bioclip2``, ``openai``, ``simple``, ``none``) and their resolver."""
from __future__ import annotations

from collections.abc import Callable, Sequence
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


def resolve_templates(templates: str | Sequence[str | Callable[[str], str]] | None, *,
                      default: str = DEFAULT_TEMPLATES, callables: bool = False) -> list:
    """A template set name (``bioclip2``, ``openai``, ``simple``, ``none``), one ``{}`` format string, or a list of
    them; ``None`` is ``default`` (evaluation: ``bioclip2``; pybioclip's custom labels: ``openai``).

    ``callables=False`` gives ``str.format`` strings; ``callables=True`` gives functions ``name -> text``
    (pybioclip's form) and also accepts functions in the list.
    """
    if templates is None:
        templates = default
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            out = list(TEMPLATE_SETS[templates]())
        elif "{}" in templates:
            out = [templates]
        else:
            raise ValueError(f"templates={templates!r}: not one of {sorted(TEMPLATE_SETS)} and has no '{{}}' "
                             f"placeholder")
    else:
        out = list(templates)
        if not out:
            raise ValueError("templates is empty")
        bad = [t for t in out if not (callables and callable(t)) and not (isinstance(t, str) and "{}" in t)]
        if bad:
            raise ValueError(f"templates must be str.format strings with one '{{}}' placeholder"
                             f"{' or functions name -> text' if callables else ''}; bad: {bad[:3]}")
    if not callables:
        return out
    return [t if callable(t) else (lambda c, t=t: t.format(c)) for t in out]
