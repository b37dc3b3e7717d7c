"""Zero-shot classification the way BioCLIP / BioCLIP 2 evaluate it.

A class's text embedding is the normalized mean of the embeddings of ``template.format(name)`` over the templates
and over the requested text types (``as_is``, ``taxonomic``, ``scientific``, ``common``, ``scientific_common``,
``taxonomic_common``; the reference's ``asis``/``taxon``/``sci``/``com``/``sci_com``/``taxon_com`` are accepted).
Images are scored by cosine similarity against these class embeddings; top-1 / top-3 / top-5 and per-class accuracy
are reported as fractions in [0, 1], as the BioCLIP 2 reference reports them.

Templates: ``bioclip2`` (the default) is the reference's 81: its training caption ``"a photo of {}."`` followed by
CLIP's 80 OpenAI ImageNet templates (``openai_imagenet_template`` in the bioclip-2 repository's
``src/training/imagenet_zeroshot_data.py``). ``openai`` is the 80 alone. Class names follow the reference's naming
rules when the classes come from :mod:`bioclip_fast.eval.datasets` (see :mod:`bioclip_fast.eval.naming`).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from bioclip_fast.eval.naming import EVAL_TEXT_TYPES, canonical_text_type
from bioclip_fast.templates import DEFAULT_TEMPLATES, TEMPLATE_SETS  # noqa: F401 - public here too
from bioclip_fast.templates import resolve_templates as _resolve_templates
from bioclip_fast.taxonomy import RANKS, TEXT_TYPES


def resolve_templates(templates: str | Sequence[str] | None) -> list[str]:
    """A template set name (``bioclip2``, the default, ``openai``, ``simple``, ``none``) or an explicit list of ``{}``
    format strings, as format strings (:func:`bioclip_fast.templates.resolve_templates`)."""
    return _resolve_templates(templates, default=DEFAULT_TEMPLATES)


def resolve_text_types(text_types: str | Sequence[str] | None) -> list[str]:
    if text_types is None:
        return ["taxonomic_common"]
    if isinstance(text_types, str):
        text_types = ["all"] if text_types == "all" else [t.strip() for t in text_types.split(",") if t.strip()]
    out = list(text_types)
    if out == ["all"]:
        return list(TEXT_TYPES)
    if not out:
        raise ValueError(f"text_types={text_types!r} is empty; choose from {EVAL_TEXT_TYPES} or 'all'")
    try:
        return list(dict.fromkeys(canonical_text_type(t) for t in out))
    except ValueError as e:
        raise ValueError(f"text_types={text_types!r}: {e}") from None


def _get(cls: Any, key: str) -> str:
    if isinstance(cls, dict):
        val = cls.get(key, cls.get("cls") if key == "class" else None)
    else:
        val = getattr(cls, "cls" if key == "class" else key, None)
    return "" if val is None else str(val).strip()


def _species_epithet(cls: Any) -> str:
    # `species` may hold the epithet ("plexippus") or the binomial ("Danaus plexippus"); normalize to the epithet
    genus, species = _get(cls, "genus"), _get(cls, "species")
    if genus and species.startswith(genus + " "):
        return species[len(genus) + 1 :]
    return species


def class_text(cls: Any, text_type: str) -> str:
    """The bare name (no template) of a class for one text type, in BioCLIP's formats.

    ``cls`` is a :class:`bioclip_fast.eval.naming.ReferenceTaxon` (the reference's naming rules), a
    :class:`bioclip_fast.taxonomy.Taxon`, a metadata row (dict with rank columns, ``common_name``,
    ``scientific_name``) or a plain string (used as is for every text type: custom labels).
    """
    try:
        text_type = canonical_text_type(text_type)
    except ValueError:
        raise ValueError(f"text_type={text_type!r}; choose from {EVAL_TEXT_TYPES}") from None
    if isinstance(cls, str):
        if not cls.strip():
            raise ValueError("empty class name")
        return cls.strip()
    from bioclip_fast.eval.naming import ReferenceTaxon

    if isinstance(cls, ReferenceTaxon):
        return cls.text(text_type)
    if text_type == "as_is":
        if isinstance(cls, dict):
            return _get(cls, "label") or _get(cls, "scientific_name") or class_text(cls, "scientific")
        return str(getattr(cls, "scientific_name", cls))
    if hasattr(cls, "text") and callable(cls.text) and not isinstance(cls, dict):
        return str(cls.text(text_type, template=False))
    genus, epithet = _get(cls, "genus"), _species_epithet(cls)
    scientific = " ".join(p for p in (genus, epithet) if p) or _get(cls, "scientific_name")
    common = _get(cls, "common_name")
    taxonomic = " ".join(p for p in (*(_get(cls, r) for r in RANKS[:-2]), scientific) if p)
    if text_type == "taxonomic":
        name = taxonomic
    elif text_type == "scientific":
        name = scientific
    elif text_type == "common":
        name = common or scientific  # no common name: fall back like BioCLIP does
    elif text_type == "scientific_common":
        name = f"{scientific} with common name {common}" if common else scientific
    else:
        name = f"{taxonomic} with common name {common}" if common else taxonomic
    if not name:
        raise ValueError(f"class {cls!r} has no names for text type {text_type!r}")
    return name


def class_name(cls: Any) -> str:
    """A short display name: the scientific name of a Taxon or row, or the string itself."""
    if isinstance(cls, str):
        return cls
    sci = _get(cls, "scientific_name")
    return sci or class_text(cls, "scientific")


def inference_autocast(device: torch.device):
    """bf16 autocast on CUDA (how the reference evaluates), none on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _trimmable(model: nn.Module) -> bool:
    from open_clip.model import CLIP

    return (
        type(model) is CLIP
        and getattr(model, "text_pool_type", None) == "argmax"
        and isinstance(getattr(model, "attn_mask", None), torch.Tensor)
    )


def encode_text_trimmed(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` without the padding columns after the last end-of-text token in the batch.

    Exact for open_clip's causal, argmax-pooled CLIP text tower: under the causal mask no position attends to a later
    one, so columns after every sequence's EOT token never reach the pooled EOT feature. Class prompts use ~20-30 of
    the 77 positions, so zero-shot classifiers build 2-3x faster. Other text towers take the ordinary path.
    """
    if not _trimmable(model):
        return model.encode_text(tokens)
    from open_clip.transformer import text_global_pool

    length = int(tokens.argmax(dim=-1).max()) + 1  # EOT has the largest id in CLIP's vocabulary
    t = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(t).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, t, "argmax")
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x


@torch.no_grad()
def encode_texts(
    model: nn.Module, tokenizer, texts: Sequence[str], *, device: str | torch.device = "cpu", batch_size: int = 256
) -> torch.Tensor:
    """L2-normalized text features (N x D, float32, on ``device``), in the order of ``texts``.

    Texts are batched in order of token length so each batch is trimmed to its own longest prompt.
    """
    device = torch.device(device)
    if len(texts) == 0:
        return torch.empty(0, 0, device=device)
    tokens = tokenizer(list(texts))
    order = tokens.argmax(dim=-1).argsort()
    out = torch.empty(0)
    for i in range(0, len(texts), batch_size):
        idx = order[i : i + batch_size]
        with inference_autocast(device):
            feats = encode_text_trimmed(model, tokens[idx].to(device))
        feats = nn.functional.normalize(feats.float(), dim=-1)
        if i == 0:
            out = torch.empty(len(texts), feats.shape[1], device=device)
        out[idx.to(device)] = feats
    return out


@torch.no_grad()
def zero_shot_classifier(
    model: nn.Module,
    tokenizer,
    classes: Sequence[Any],
    *,
    text_types: str | Sequence[str] | None = None,
    templates: str | Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """Class weights (D x C): per class, the normalized mean over text types x templates of the text embeddings."""
    if len(classes) == 0:
        raise ValueError("classes is empty")
    types = resolve_text_types(text_types)
    temps = resolve_templates(templates)
    # all (class, template) prompts of a chunk of classes go through the text tower together, in length-sorted
    # batches: one call per 256 prompts instead of one per template (81 tiny calls for a 3-class benchmark)
    chunk = max(1, 8192 // len(temps))
    weights = None
    for tt in types:
        names = [class_text(c, tt) for c in classes]
        parts = []
        for i in range(0, len(names), chunk):
            block = names[i : i + chunk]
            f = encode_texts(model, tokenizer, [t.format(n) for n in block for t in temps], device=device,
                             batch_size=batch_size)
            parts.append(f.view(len(block), len(temps), -1).sum(1))
        per_type = nn.functional.normalize(torch.cat(parts), dim=-1)
        weights = per_type if weights is None else weights + per_type
    return nn.functional.normalize(weights, dim=-1).T.contiguous()


@torch.no_grad()
def encode_images(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    *,
    device: str | torch.device = "cpu",
    desc: str = "encode images",
    progress: bool = True,
    normalize: bool = True,
) -> dict[str, Any]:
    """Run the image tower over a loader; returns {"features": N x D float32 (cpu; L2-normalized unless
    ``normalize=False``), "labels": N int64
    (or None), "keys": list (or None), "skipped": [{"image", "error"}], "index": dataset positions of the rows
    (or None)}. Batches are dicts with "image" and optionally
    "label", "key" and "skipped" (images the loader could not read; see
    :func:`bioclip_fast.eval.datasets.collate_skipping`)."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    feats, labels, keys, skipped, index = [], [], [], [], []
    has_label = has_key = True
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, desc=desc, total=total, disable=not progress, leave=False):
        if not isinstance(batch, dict) or "image" not in batch:
            raise ValueError("loader must yield dicts with an 'image' tensor")
        skipped.extend(batch.get("skipped") or [])
        if batch["image"] is None:  # every image of the batch was unreadable
            continue
        images = batch["image"].to(device, non_blocking=True)
        with inference_autocast(device):
            f = model.encode_image(images)
        f = f.float()
        feats.append((nn.functional.normalize(f, dim=-1) if normalize else f).cpu())
        if has_label and batch.get("label") is not None:
            labels.append(torch.as_tensor(batch["label"]).reshape(-1).long().cpu())
        else:
            has_label = False
        if batch.get("index") is not None:
            index.extend(int(i) for i in batch["index"])
        if has_key and batch.get("key") is not None:
            keys.extend(list(batch["key"]))
        else:
            has_key = False
    if not feats:
        if skipped:
            raise ValueError(f"no readable image: all {len(skipped)} images were skipped (first: "
                             f"{skipped[0]['image']}: {skipped[0]['error']})")
        raise ValueError("loader yielded no batches")
    return {
        "skipped": skipped,
        "index": index if len(index) == sum(len(f) for f in feats) else None,  # dataset position of each row
        "features": torch.cat(feats),
        "labels": torch.cat(labels) if has_label and labels else None,
        "keys": keys if has_key else None,
    }


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the k highest logits (k clipped to the number of classes)."""
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top.eq(labels[:, None])
    return {k: hit[:, : min(k, maxk)].any(dim=1).float().mean().item() for k in ks}


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[Any]) -> dict[str, Any]:
    """top1 / top3 / top5 / per-class accuracy (fractions) / n / mean per-class accuracy."""
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"labels out of range for {len(classes)} classes: [{labels.min()}, {labels.max()}]")
    acc = topk_accuracy(logits, labels, (1, 3, 5))
    pred = logits.argmax(dim=1)
    per_class = {}
    for c, cls in enumerate(classes):
        mask = labels == c
        if mask.any():
            per_class[class_name(cls)] = (pred[mask] == c).float().mean().item()
    return {
        "top1": acc[1],
        "top3": acc[3],
        "top5": acc[5],
        "mean_per_class": float(np.mean(list(per_class.values()))) if per_class else float("nan"),
        "per_class": per_class,
        "n": int(labels.numel()),
    }


@torch.no_grad()
def zero_shot_logits(
    model: nn.Module,
    tokenizer,
    loader: Iterable[dict[str, Any]],
    classes: Sequence[Any],
    *,
    text_types: str | Sequence[str] | None = None,
    templates: str | Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Image features, labels and per-text-type plus combined cosine-similarity logits (N x C, cpu)."""
    was_training = model.training
    model.eval()
    try:
        enc = encode_images(model, loader, device=device, desc="zero-shot: images", progress=progress)
        if enc["labels"] is None:
            raise ValueError("zero-shot evaluation needs a 'label' in every batch")
        types = resolve_text_types(text_types)
        per_type = {
            tt: zero_shot_classifier(model, tokenizer, classes, text_types=[tt], templates=templates, device=device).cpu()
            for tt in types
        }
    finally:
        model.train(was_training)
    feats = enc["features"]
    combined = nn.functional.normalize(sum(w.T for w in per_type.values()), dim=-1).T
    return {
        **enc,
        "logits": feats @ combined,
        "logits_by_text_type": {tt: feats @ w for tt, w in per_type.items()},
    }


def zero_shot_eval(
    model: nn.Module,
    tokenizer,
    loader: Iterable[dict[str, Any]],
    classes: Sequence[Any],
    *,
    text_types: str | Sequence[str] | None = None,
    templates: str | Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on ``loader`` (batches with "image" normalized tensors and "label" indices into
    ``classes``).

    ``text_types``: one or several of :data:`TEXT_TYPES` (default ``taxonomic_common``), or ``"all"``; with several,
    class embeddings are averaged over them (an ensemble) and each type is also scored alone under ``by_text_type``.
    ``templates``: a set name (``bioclip2`` — the default, 81; ``openai``, 80; ``simple``; ``none``) or a list of ``{}`` format strings.

    Returns ``{"top1", "top3", "top5", "mean_per_class", "per_class": {name: acc}, "n", "text_types", "n_templates",
    "by_text_type": {type: {"top1", "top3", "top5"}}, "skipped_images"}`` with accuracies as fractions in [0, 1].
    """
    out = zero_shot_logits(
        model, tokenizer, loader, classes, text_types=text_types, templates=templates, device=device, progress=progress
    )
    labels = out["labels"]
    result = classification_metrics(out["logits"], labels, classes)
    result["text_types"] = list(out["logits_by_text_type"])
    result["n_templates"] = len(resolve_templates(templates))
    result["skipped_images"] = out.get("skipped", [])
    result["by_text_type"] = {
        tt: {k: v for k, v in classification_metrics(lg, labels, classes).items() if k in ("top1", "top3", "top5")}
        for tt, lg in out["logits_by_text_type"].items()
    }
    return result
