"""Write and read TreeOfLife-200M-layout webdataset shards.

Output of `make_shards(image_root, csv, out_dir)`:

    shard-000000.tar    samples `<key>.jpg` + the ten TreeOfLife text members (`<key>.sci.txt`, ...)
    shard-000000.idx    DALI `wds2idx` index (v1.2, `write_dali_index`): per sample "ext offset size name ...", for
                        DALI's own `fn.readers.webdataset`; our loader does not read it
    shard-000000.json   build record: keys, class index per sample (into the manifest's classes), skipped images
    manifest.json       counts per shard, classes (taxa) with counts, skipped images, the build config
    shard-000000.tar.bfidx.npz, bioclip_index.json (+ its class table)
                        the shard index the loader reads (`bioclip_fast.data.index`; with `index=True`, the default)

A shard is a fixed chunk of `samples_per_shard` CSV rows, so a rerun with `resume=True` rebuilds only the shards
whose build record is missing (the record is renamed into place last). Unreadable images are skipped and listed.
"""
from __future__ import annotations

import contextlib
import csv as csv_module
import hashlib
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bioclip_fast.data.shardspec import resolve_shards  # noqa: F401 - the one resolver, re-exported
from bioclip_fast.data.tar import add_member, member_key, tar_samples
from bioclip_fast.errors import DataError
from bioclip_fast.fileio import atomic_save, atomic_write_text
from bioclip_fast.taxonomy import RANKS, SHARD_TEXT_KEYS, Taxon, taxon_from_texts

FORMAT = "bioclip_fast/shards/1"
MANIFEST = "manifest.json"
DALI_IDX_VERSION = "v1.2"
REQUIRED_COLUMNS = ("image",)
TAXON_COLUMNS = RANKS + ("scientific_name",)
# columns a full metadata CSV has (the bundled metadata.csv); a missing one is an error unless allowed
EXPECTED_COLUMNS = REQUIRED_COLUMNS + RANKS + ("scientific_name", "common_name")


def _norm_column(name: str) -> str:
    """'commonName' / 'Common Name' / 'COMMON-NAME' -> 'common_name' (for suggestions only)."""
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name.strip())
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")


def check_columns(header: Sequence[str], path: str | os.PathLike, *, allow_missing: bool = False) -> None:
    """Validate a metadata CSV header: every taxonomy column present, or an error naming the missing ones and the
    header columns that look like them (`Family` -> `family`, `commonName` -> `common_name`)."""
    import difflib

    present = set(header)
    missing = [c for c in EXPECTED_COLUMNS if c not in present]
    if not missing:
        return
    unknown = [h for h in header if h not in EXPECTED_COLUMNS]
    by_norm = {}
    for h in unknown:
        by_norm.setdefault(_norm_column(h), h)
    hints = []
    for c in missing:
        close = difflib.get_close_matches(c, list(by_norm), n=1, cutoff=0.7)
        if close:
            hints.append(f"'{by_norm[close[0]]}' -> '{c}'")
    if hints:
        raise DataError(f"{path}: missing column(s) {missing}; the header has similar column(s), rename them: "
                        f"{', '.join(hints)}")
    if "image" in missing:
        raise DataError(f"{path}: header {list(header)} lacks the required column 'image'")
    if not any(c in present for c in TAXON_COLUMNS):  # --allow-missing-columns cannot help: never suggest it
        raise DataError(f"{path}: header {list(header)} has none of the taxonomy columns {list(TAXON_COLUMNS)}; "
                        "at least one rank column or scientific_name is needed to caption the images")
    if not allow_missing:
        raise DataError(f"{path}: missing taxonomy column(s) {missing} (expected {list(EXPECTED_COLUMNS)}); captions "
                        "would silently lack them. Add the columns (empty values are fine) or pass "
                        "--allow-missing-columns")


# ---------------------------------------------------------------------------------------------------------------------
# metadata CSV
# ---------------------------------------------------------------------------------------------------------------------
def read_metadata(csv_path: str | os.PathLike, *, check_all_columns: bool = False,
                  allow_missing: bool = False) -> list[dict[str, str]]:
    """Read and validate a metadata CSV (`image` + taxonomy columns, as the bundled `metadata.csv`).

    Every row must have as many fields as the header, a non-empty `image`, and at least one rank or a
    `scientific_name`. Errors name the file, the line and the problem.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata CSV not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv_module.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ValueError(f"{path}: empty file, expected a header row with an 'image' column") from None
        if check_all_columns:
            check_columns(header, path, allow_missing=allow_missing)
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: header {header} lacks required column(s) {missing}")
        if not any(c in header for c in TAXON_COLUMNS):
            raise ValueError(f"{path}: header {header} has none of the taxonomy columns {TAXON_COLUMNS}")
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise ValueError(f"{path}: duplicate column(s) {dupes} in header")
        rows = []
        for line_no, fields in enumerate(reader, start=2):
            if not fields or all(not x.strip() for x in fields):
                continue  # blank line
            if len(fields) != len(header):
                raise ValueError(
                    f"{path}: line {line_no} has {len(fields)} fields, the header has {len(header)} "
                    f"({', '.join(header)}): {fields!r}"
                )
            row = {h: v.strip() for h, v in zip(header, fields)}
            if not row["image"]:
                raise ValueError(f"{path}: line {line_no} has an empty 'image' field: {fields!r}")
            try:
                Taxon.from_row(row)
            except ValueError:
                raise ValueError(
                    f"{path}: line {line_no} ({row['image']}) has no taxonomy: all of {TAXON_COLUMNS} are empty"
                ) from None
            row["_line"] = str(line_no)
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return rows


def sample_key(image: str) -> str:
    """Webdataset key of an image path: the path without extension, with '/' and '.' made '_' (webdataset splits
    member names at the first dot of the basename)."""
    stem = os.path.splitext(image.replace("\\", "/"))[0].lstrip("./")
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", stem.replace("/", "_"))
    if not key:
        raise ValueError(f"cannot make a sample key from image path {image!r}")
    return key


# ---------------------------------------------------------------------------------------------------------------------
# image encoding (runs in worker processes)
# ---------------------------------------------------------------------------------------------------------------------
def encode_image(path: str, image_size: int, resize: str = "shorter", quality: int = 95) -> tuple[bytes | None, str]:
    """Read an image, resize it (shorter side -> image_size, or squash to a square), and return JPEG bytes.

    Returns (None, reason) for missing/unreadable/corrupt files. A JPEG that already has the target size is
    copied byte for byte (after a full decode to prove it is intact), so re-sharding never recompresses.
    """
    from PIL import Image

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    try:
        img = Image.open(io.BytesIO(raw))
        w, h = img.size
        if resize == "square":
            target = (image_size, image_size)
        else:
            s = image_size / min(w, h)
            target = (max(1, round(w * s)), max(1, round(h * s)))
        if img.format == "JPEG" and (w, h) == target and img.mode == "RGB":
            img.load()  # raises on truncated/corrupt data
            return raw, ""
        if img.format == "JPEG":
            img.draft("RGB", target)  # DCT-domain downscale: decode at 1/2, 1/4, 1/8 when the target is small
        img = img.convert("RGB")
        if img.size != target:
            img = img.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=quality)
        return out.getvalue(), ""
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this image"
        return None, f"corrupt: {type(e).__name__}: {e}"


def _encode_task(args: tuple[str, int, str, int]) -> tuple[bytes | None, str]:
    return encode_image(*args)


# ---------------------------------------------------------------------------------------------------------------------
# the DALI `.idx` index (for `fn.readers.webdataset`; the loader reads through the shard index, `data.index`)
# ---------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _tar_errors(path):
    """Name the shard in errors from a truncated or damaged archive."""
    try:
        yield
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(f"{path}: damaged tar archive ({type(e).__name__}: {e})") from None


def write_dali_index(tar_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> Path:
    """Write the DALI `fn.readers.webdataset` index (same format as DALI's `wds2idx`) for a tar shard.

    A damaged tar raises :class:`~bioclip_fast.errors.DataError` (from :func:`tar.tar_samples`, the one tar walker);
    a tar DALI cannot index (no samples, a member name with a space) raises ``ValueError``."""
    tar_path = Path(tar_path)
    idx_path = Path(idx_path) if idx_path is not None else tar_path.with_suffix(".idx")
    samples = tar_samples(tar_path)
    if not samples:
        raise ValueError(f"{tar_path}: no samples; DALI cannot index an empty shard")
    lines = [f"{DALI_IDX_VERSION} {len(samples)}"]
    for _, members in samples:
        if any(" " in name for *_, name in members):
            raise ValueError(f"{tar_path}: member names with spaces cannot be indexed: {members[0][3]!r}")
        lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in members))
    atomic_write_text(idx_path, "\n".join(lines) + "\n")
    return idx_path


def read_dali_index(idx_path: str | os.PathLike) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Parse a DALI webdataset index: [(key, {ext: (offset, size)}), ...]."""
    idx_path = Path(idx_path)
    with idx_path.open() as f:
        head = f.readline().split()
        if len(head) != 2 or not head[0].startswith("v1."):
            raise ValueError(f"{idx_path}: not a DALI webdataset index (first line {' '.join(head)!r})")
        out = []
        for line_no, line in enumerate(f, start=2):
            parts = line.split()
            if not parts:
                continue
            if len(parts) % 4:
                raise ValueError(f"{idx_path}: line {line_no} is malformed (expected 'ext offset size name' groups)")
            members = {}
            key = None
            for i in range(0, len(parts), 4):
                ext, off, size, name = parts[i : i + 4]
                members[ext] = (int(off), int(size))
                key = key or name[: len(name) - len(ext) - 1]
            out.append((key, members))
    if len(out) != int(head[1]):
        raise ValueError(f"{idx_path}: header says {head[1]} samples, found {len(out)} (truncated index?)")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# make_shards
# ---------------------------------------------------------------------------------------------------------------------
def _fingerprint(rows: Sequence[Mapping[str, str]], **config: Any) -> str:
    h = hashlib.sha1()
    h.update(json.dumps(config, sort_keys=True).encode())
    for r in rows:
        h.update(json.dumps({k: v for k, v in r.items() if k != "_line"}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def make_shards(
    image_root: str | os.PathLike,
    csv: str | os.PathLike | Sequence[Mapping[str, str]],
    out_dir: str | os.PathLike,
    samples_per_shard: int = 10000,
    workers: int | None = None,
    image_size: int = 224,
    resume: bool = True,
    *,
    resize: str = "shorter",
    quality: int = 95,
    progress: bool = True,
    allow_missing_columns: bool = False,
    index: bool = True,
) -> dict[str, Any]:
    """Build TreeOfLife-200M-layout shards from images + metadata; returns the manifest (also in `manifest.json`).

    `csv` is a metadata CSV path or already-validated rows (`read_metadata` output, e.g. one split). Image paths are
    relative to `image_root` (or absolute). `resize`: "shorter" keeps the aspect ratio with the shorter side at
    `image_size`; "square" squashes to image_size x image_size as BioCLIP's `make_wds.py` does.
    """
    from tqdm import tqdm

    image_root = Path(image_root)
    out_dir = Path(out_dir)
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be a positive int, got {samples_per_shard!r}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if resize not in ("shorter", "square"):
        raise ValueError(f"resize must be 'shorter' or 'square', got {resize!r}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality!r}")
    if not image_root.is_dir():
        raise FileNotFoundError(f"image_root is not a directory: {image_root}")
    if isinstance(csv, (str, os.PathLike)):
        source = str(csv)
        rows = read_metadata(csv, check_all_columns=True, allow_missing=allow_missing_columns)
    else:
        source = "<rows>"
        rows = [dict(r) for r in csv]
        if not rows:
            raise ValueError("csv: no rows given")
    workers = max(1, int(workers if workers is not None else min(8, os.cpu_count() or 1)))

    # keys must be unique: they are the sample ids everywhere downstream (eval, embeddings)
    # keys are file stems ("0010001") unless two images share a stem, then the whole relative path
    stems = [sample_key(os.path.basename(r["image"])) for r in rows]
    use_stems = len(set(stems)) == len(stems)
    keys: list[str] = []
    seen: dict[str, str] = {}
    for r, stem in zip(rows, stems):
        k = stem if use_stems else sample_key(r["image"])
        if k in seen:
            raise ValueError(
                f"{source}: line {r.get('_line', '?')} ({r['image']}) has the same sample key {k!r} as "
                f"line {seen[k]}; image paths must be unique"
            )
        seen[k] = r.get("_line", "?")
        keys.append(k)
    taxa = [Taxon.from_row(r) for r in rows]
    classes: dict[str, Taxon] = {}
    for t in taxa:
        classes.setdefault(t.label, t)
    class_labels = sorted(classes)
    class_index = {lab: i for i, lab in enumerate(class_labels)}

    config = {"format": FORMAT, "samples_per_shard": samples_per_shard, "image_size": image_size,
              "resize": resize, "quality": int(quality)}
    fp = _fingerprint(rows, image_root=str(image_root.resolve()), **config)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_shards = (len(rows) + samples_per_shard - 1) // samples_per_shard

    def build_record(i: int) -> Path:
        return out_dir / f"shard-{i:06d}.json"

    pending = []
    for i in range(n_shards):
        sc = build_record(i)
        if resume and sc.exists():
            try:
                meta = json.loads(sc.read_text())
            except (OSError, json.JSONDecodeError):
                meta = {}
            files_ok = meta.get("count", 0) == 0 or all(
                (out_dir / f"shard-{i:06d}.{ext}").exists() for ext in ("tar", "idx"))
            if meta.get("fingerprint") == fp and files_ok:
                continue
            if meta.get("fingerprint") not in (None, fp):
                raise ValueError(
                    f"{out_dir} holds shards built from different input or settings (fingerprint "
                    f"{meta.get('fingerprint')} != {fp}); use a new out_dir or resume=False"
                )
        pending.append(i)

    # shards numbered beyond this build (left by an earlier, larger build) would be picked up by directory globs
    for stale in out_dir.glob("shard-*.*"):
        m = re.fullmatch(r"shard-(\d{6})\.(tar|idx|json|tar\.bfidx\.npz)", stale.name)
        if m and int(m.group(1)) >= n_shards:
            stale.unlink()

    t0 = time.time()
    pbar = tqdm(total=len(rows), desc="make-shards", unit="img", disable=not progress)
    pbar.update(len(rows) - sum(min(samples_per_shard, len(rows) - i * samples_per_shard) for i in pending))
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for i in pending:
            lo, hi = i * samples_per_shard, min(len(rows), (i + 1) * samples_per_shard)
            tasks = [
                (str(Path(rows[j]["image"]) if os.path.isabs(rows[j]["image"]) else image_root / rows[j]["image"]),
                 image_size, resize, int(quality))
                for j in range(lo, hi)
            ]
            results = pool.map(_encode_task, tasks, chunksize=8) if pool else map(_encode_task, tasks)
            tar_path = out_dir / f"shard-{i:06d}.tar"
            written_keys, labels, skipped = [], [], []

            def write_tar(tmp: Path) -> None:
                with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
                    for j, (data, err) in zip(range(lo, hi), results):
                        pbar.update(1)
                        if data is None:
                            skipped.append({"image": rows[j]["image"], "line": rows[j].get("_line"), "error": err})
                            continue
                        add_member(tf, f"{keys[j]}.jpg", data)
                        for member, text in taxa[j].shard_texts().items():
                            add_member(tf, f"{keys[j]}.{member}", text.encode())
                        written_keys.append(keys[j])
                        labels.append(class_index[taxa[j].label])

            atomic_save(tar_path, write_tar, mkdir=False)
            if written_keys:
                write_dali_index(tar_path)
            else:  # every image of the chunk was skipped: no tar (nor one left by an earlier build)
                for p in (tar_path, tar_path.with_suffix(".idx"), Path(str(tar_path) + ".bfidx.npz")):
                    p.unlink(missing_ok=True)
            meta = {"format": FORMAT, "fingerprint": fp, "count": len(written_keys), "keys": written_keys,
                    "labels": labels, "skipped": skipped}
            atomic_write_text(build_record(i), json.dumps(meta))  # last: marks the shard complete for resume
    finally:
        pbar.close()
        if pool:
            pool.shutdown()

    shards, skipped_all = [], []
    class_counts = [0] * len(class_labels)
    for i in range(n_shards):
        meta = json.loads(build_record(i).read_text())
        skipped_all.extend(meta["skipped"])
        for lab in meta["labels"]:
            class_counts[lab] += 1
        if meta["count"]:  # a chunk whose images were all skipped has no tar: the manifest lists only real files
            shards.append({"name": f"shard-{i:06d}.tar", "count": meta["count"], "skipped": len(meta["skipped"])})
    if not shards:
        first = skipped_all[0] if skipped_all else {"image": "?", "error": "?"}
        raise DataError(f"make-shards wrote nothing: all {len(skipped_all)} image(s) were skipped (e.g. "
                        f"{first['image']}: {first['error']}); check the image root {image_root} "
                        "(--images; CSV image paths are relative to it)")
    manifest = {
        "format": FORMAT,
        "fingerprint": fp,
        "source": source,
        "image_root": str(image_root),
        **{k: v for k, v in config.items() if k != "format"},
        "num_samples": sum(s["count"] for s in shards),
        "num_skipped": len(skipped_all),
        "num_classes": len(class_labels),
        "text_keys": list(SHARD_TEXT_KEYS),
        "shards": shards,
        "classes": [{"label": lab, "count": c, **classes[lab].to_dict()} for lab, c in zip(class_labels, class_counts)],
        "skipped": skipped_all,
        "seconds": round(time.time() - t0, 2),
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1))
    if index:  # the loader's shard index (offsets, taxa, caption members): no header scan at training startup
        from bioclip_fast.data.index import index_shards

        index_shards([str(out_dir / s["name"]) for s in shards], out_dir, workers=workers, progress=False, merge=False)
    return manifest


# ---------------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------------
def iter_shard_samples(shards: str | os.PathLike | Iterable[str | os.PathLike]) -> Iterator[dict[str, Any]]:
    """Stream samples in archive order: {"key", "jpg" (bytes), "texts" {member: str}, "taxon" (Taxon|None),
    "shard"}. Members other than jpg/txt are under "extra". Reads any webdataset tar, not only ours."""
    for shard in resolve_shards(shards):
        current: dict[str, Any] | None = None
        with _tar_errors(shard), tarfile.open(shard, "r:") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                split = member_key(m.name)
                if split is None:
                    continue
                key, ext = split
                if current is None or current["key"] != key:
                    if current is not None:
                        yield _finish_sample(current)
                    current = {"key": key, "jpg": None, "texts": {}, "extra": {}, "shard": shard}
                data = tf.extractfile(m).read()
                if ext in ("jpg", "jpeg"):
                    current["jpg"] = data
                elif ext.endswith("txt"):
                    current["texts"][ext] = data.decode("utf-8", errors="replace")
                else:
                    current["extra"][ext] = data
        if current is not None:
            yield _finish_sample(current)


def _finish_sample(sample: dict[str, Any]) -> dict[str, Any]:
    sample["taxon"] = taxon_from_texts(sample["texts"])
    return sample
