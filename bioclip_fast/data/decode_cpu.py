"""CPU image path: JPEG header checks, crop boxes, and PIL decode with DCT-domain downscaling.

Crop boxes are computed on the host from per-slot uniforms (torchvision's RandomResizedCrop algorithm), so the CPU
and DALI backends apply the same crop to the same sample and a resumed run repeats the augmentation exactly.
Boxes are (x, y, w, h) in pixels of the original image.
"""
from __future__ import annotations

import io
import math

import numpy as np

# open_clip's training defaults (open_clip.transform: RandomResizedCrop(scale=(0.9, 1.0)), ratio 3/4..4/3)
DEFAULT_SCALE = (0.9, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
N_ATTEMPTS = 10
UNIFORMS_PER_SLOT = N_ATTEMPTS * 4


class CorruptImage(ValueError):
    """Raised for bytes that are not a decodable JPEG/PNG image."""


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the SOF segment, walking the marker segments up to the first scan (~10x cheaper than
    PIL's header parse, which matters at GPU decode rates)."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise CorruptImage(f"JPEG marker expected at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2 or i + 2 + length > n:
            raise CorruptImage(f"JPEG segment 0x{marker:02X} at byte {i} overruns the data")
        if marker in _SOF:
            if length < 7:
                raise CorruptImage("JPEG frame header too short")
            h = (data[i + 5] << 8) | data[i + 6]
            w = (data[i + 7] << 8) | data[i + 8]
            return w, h
        if marker == 0xDA:
            break
        i += 2 + length
    raise CorruptImage("JPEG without a frame header")


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header, after cheap structural checks.

    A JPEG must have an EOI (FF D9) after its last scan: with the header parse this catches garbage bytes and
    truncated files before they reach a GPU decoder that would fail the whole batch.
    """
    if len(data) < 16:
        raise CorruptImage(f"only {len(data)} bytes")
    jpeg = bytes(data[:3]) == b"\xff\xd8\xff"  # bytes(): `data` may be a memoryview into a batch buffer
    if jpeg and b"\xff\xd9" not in bytes(data[-64:]):
        # Camera trailers may follow EOI; entropy-coded data cannot contain FF D9 / FF DA (0xFF is byte-stuffed),
        # so a complete image has an EOI after its last start-of-scan marker.
        whole = bytes(data)
        if whole.rfind(b"\xff\xd9") < whole.rfind(b"\xff\xda") or whole.rfind(b"\xff\xda") < 0:
            raise CorruptImage("JPEG without end-of-image marker (truncated)")
    if jpeg:
        w, h = _jpeg_size(data)
    else:  # PNG/WebP/...: let PIL read the header
        from PIL import Image

        try:
            with Image.open(io.BytesIO(bytes(data))) as img:
                w, h = img.size
        except Exception as e:  # noqa: BLE001
            raise CorruptImage(f"{type(e).__name__}: {e}") from None
    if w < 1 or h < 1:
        raise CorruptImage(f"invalid size {w}x{h}")
    return w, h


def random_resized_crop_boxes(w, h, u: np.ndarray, scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params for a batch, vectorized: w, h [B]; u [B, UNIFORMS_PER_SLOT]
    uniforms in [0, 1) -> int64 boxes [B, 4] (x, y, w, h). The first of N_ATTEMPTS draws that fits wins, else the
    central crop with the ratio clamped into range."""
    w = np.asarray(w, dtype=np.int64).reshape(-1)
    h = np.asarray(h, dtype=np.int64).reshape(-1)
    u = np.asarray(u, dtype=np.float64).reshape(len(w), N_ATTEMPTS, 4)
    area = (w * h).astype(np.float64)[:, None]
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = np.exp(log_r0 + (log_r1 - log_r0) * u[..., 1])
    cw = np.round(np.sqrt(target * aspect)).astype(np.int64)
    ch = np.round(np.sqrt(target / aspect)).astype(np.int64)
    W, H = w[:, None], h[:, None]
    ok = (cw > 0) & (cw <= W) & (ch > 0) & (ch <= H)
    first = np.argmax(ok, axis=1)
    rows = np.arange(len(w))
    found = ok[rows, first]
    cw1, ch1 = cw[rows, first], ch[rows, first]
    x = np.minimum((u[rows, first, 2] * (w - cw1 + 1)).astype(np.int64), w - cw1)
    y = np.minimum((u[rows, first, 3] * (h - ch1 + 1)).astype(np.int64), h - ch1)
    # fallback: central crop with the ratio clamped into range
    in_ratio = w / np.maximum(h, 1)
    fw = np.where(in_ratio < ratio[0], w, np.where(in_ratio > ratio[1], np.round(h * ratio[1]).astype(np.int64), w))
    fh = np.where(in_ratio < ratio[0], np.round(w / ratio[0]).astype(np.int64), h)
    out = np.stack([np.where(found, x, (w - fw) // 2), np.where(found, y, (h - fh) // 2),
                    np.where(found, cw1, fw), np.where(found, ch1, fh)], axis=1)
    return out


def random_resized_crop_box(
    w: int, h: int, u: np.ndarray, scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, driven by `u` (UNIFORMS_PER_SLOT uniforms in [0, 1)); one row of
    `random_resized_crop_boxes` (the batch form the loader uses)."""
    return tuple(int(v) for v in random_resized_crop_boxes([w], [h], np.asarray(u).reshape(1, -1), scale, ratio)[0])


def center_crop_box(w: int, h: int) -> tuple[int, int, int, int]:
    """Resize-shorter-side + center-crop, expressed as a crop of the original: the centered square."""
    s = min(w, h)
    return (w - s) // 2, (h - s) // 2, s, s


def decode_crop_resize(data: bytes, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Decode `data`, crop `box` (x, y, w, h in original pixels) and resize to size x size: uint8 [size, size, 3].

    JPEG `draft` makes libjpeg decode at 1/2, 1/4 or 1/8 scale when the crop is still >= `size` afterwards, which
    is most of the CPU speed-up for small training resolutions.
    """
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        w0, h0 = img.size
        x, y, cw, ch = box
        if img.format == "JPEG":
            f = max(1.0, min(cw, ch) / size)  # allowed reduction keeping the crop >= size
            img.draft("RGB", (max(1, math.ceil(w0 / f)), max(1, math.ceil(h0 / f))))
        img = img.convert("RGB")
        sx, sy = img.size[0] / w0, img.size[1] / h0
        out = img.resize((size, size), Image.Resampling.BICUBIC, box=(x * sx, y * sy, (x + cw) * sx, (y + ch) * sy))
        return np.asarray(out, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data
        raise CorruptImage(f"{type(e).__name__}: {e}") from None
