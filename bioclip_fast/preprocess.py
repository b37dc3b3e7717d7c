"""What a model's inputs go through: its image transform and tokenizer (open_clip's), its normalization, and
pybioclip's squash-to-224 preprocessing for TreeOfLife models.
"""
from __future__ import annotations

from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def squash_preprocess(size: int = 224):
    """pybioclip's ``preprocess_img`` for TreeOfLife models: no crop, the whole image squashed to 224x224 (or the
    model's input size, for models of another size used with a species table)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.ToTensor(),
        transforms.Resize((size, size), antialias=True),
        transforms.Normalize(mean=OPENAI_MEAN, std=OPENAI_STD),
    ])


def image_transform(model: nn.Module, train: bool = False):
    """torchvision transform matching the model's image size and normalization."""
    import open_clip

    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = pp.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = pp.get("std", open_clip.OPENAI_DATASET_STD)
    return open_clip.image_transform(size, is_train=train, mean=mean, std=std)


def get_tokenizer(model: nn.Module):
    """The open_clip tokenizer for the model's text tower (CLIP BPE, no hub access)."""
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32", context_length=model.context_length)


def image_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    import open_clip

    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    return tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)), tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))
