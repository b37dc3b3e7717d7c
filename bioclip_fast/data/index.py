"""Shard index: per-sample byte offsets, taxa and captions of webdataset shards, without reading image bytes.

`index_shard(path)` walks a tar's 512-byte headers, seeks over image payloads and reads only the small text
members (the taxonomy members and the five caption members of TreeOfLife-200M, or a replay shard's `.txt`).
`bioclip-fast index-shards SPEC [--out DIR] [--workers N]` writes, per shard, a sidecar `<name>.bfidx.npz` (keys,
image/caption offsets, per-sample taxon and caption-string ids into shard-local tables), one manifest
`bioclip_index.json` (counts, sizes, content digests; small) and the binary class table beside it
(`bioclip_index.<token>.<array>.npy`: the global classes sorted by label as utf-8 text + offsets, counts, label
hashes for lookup, each shard's class ids). The loader memory-maps the class table (read-only, so the ranks of a node
share its pages through the page cache) and builds a Taxon only for a class it touches. It is resumable (a shard whose
sidecar matches its size and mtime is skipped) and can write to a cache directory when the dataset mount is
read-only. The loader reads only the manifest at startup; sidecars are loaded per shard, on first use, in the
worker that reads it.

Sidecars are `.npz` of plain arrays (`np.load(allow_pickle=False)`): nothing is unpickled.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bioclip_fast.data.tar import member_key, walk_tar
from bioclip_fast.errors import DataError
from bioclip_fast.fileio import atomic_save, atomic_write_json
from bioclip_fast.taxonomy import TEXT_TYPE_KEYS, TEXT_TYPES, Taxon, taxon_from_texts

INDEX_FORMAT = "bioclip_fast/index/1"
INDEX_MANIFEST = "bioclip_index.json"
CLASS_TABLE_FORMAT = "bioclip_fast/class-table/1"
CLASS_FIELDS = ("kingdom", "phylum", "class", "order", "family", "genus", "species", "common_name")
SIDECAR_SUFFIX = ".bfidx.npz"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# caption member of each of the five training text types (the reference's text type -> member mapping)
CAPTION_MEMBERS = tuple(TEXT_TYPE_KEYS[tt] for tt in TEXT_TYPES)


# ---------------------------------------------------------------------------------------------------------------------
# one shard's index
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ShardIndex:
    """Random-access table of one shard. Arrays have one row per sample, in archive order."""

    name: str
    size: int
    mtime_ns: int
    keys: list[str]
    img_off: np.ndarray  # int64, -1 when the sample has no image member
    img_size: np.ndarray  # int64
    img_ext: np.ndarray  # int8 index into IMAGE_EXTS, -1 none
    txt_off: np.ndarray  # int64 `.txt` member (replay captions), -1 none
    txt_size: np.ndarray
    taxon: np.ndarray  # int32 index into `taxa`, -1 when the members give no taxonomy
    taxa: list[dict[str, str]]  # shard-local taxa (Taxon.to_dict())
    captions: np.ndarray  # int32 [len(TEXT_TYPES), n] index into `strings`, -1 when the member is missing
    strings: list[str]  # shard-local unique caption strings
    bytes_read: int = 0
    head: str = ""  # head_digest of the file when indexed ("" in sidecars of older versions)

    @property
    def count(self) -> int:
        return len(self.keys)

    def members(self, j: int) -> dict[str, tuple[int, int]]:
        """{ext: (offset, size)} of sample j's image and `.txt` members (what the loader reads)."""
        out = {}
        if self.img_ext[j] >= 0:
            out[IMAGE_EXTS[int(self.img_ext[j])]] = (int(self.img_off[j]), int(self.img_size[j]))
        if self.txt_off[j] >= 0:
            out["txt"] = (int(self.txt_off[j]), int(self.txt_size[j]))
        return out

    def taxon_labels(self) -> list[str]:
        return [Taxon.from_row(t).label for t in self.taxa]

    # ---- (de)serialization: plain arrays only -------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        meta = {"format": INDEX_FORMAT, "name": self.name, "size": self.size, "mtime_ns": self.mtime_ns,
                "head": self.head, "keys": self.keys, "taxa": self.taxa, "strings": self.strings,
                "text_types": list(TEXT_TYPES)}
        blob = np.frombuffer(json.dumps(meta, separators=(",", ":")).encode(), dtype=np.uint8)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, meta=blob, img_off=self.img_off, img_size=self.img_size, img_ext=self.img_ext,
                         txt_off=self.txt_off, txt_size=self.txt_size, taxon=self.taxon, captions=self.captions)

        atomic_save(path, write, mkdir=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ShardIndex":
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes())
                arrays = {k: z[k] for k in ("img_off", "img_size", "img_ext", "txt_off", "txt_size", "taxon",
                                            "captions")}
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: unreadable shard index ({type(e).__name__}: {e}); re-run index-shards") from None
        if meta.get("format") != INDEX_FORMAT or meta.get("text_types") != list(TEXT_TYPES):
            raise DataError(f"{path}: shard index of another format ({meta.get('format')}); re-run index-shards")
        return cls(meta["name"], int(meta["size"]), int(meta["mtime_ns"]), meta["keys"], taxa=meta["taxa"],
                   strings=meta["strings"], head=meta.get("head", ""), **arrays)


HEAD_BYTES = 512


def head_digest(path: str | os.PathLike) -> str:
    """A shard's content token: sha256 (16 hex digits) of its first tar header block (the first member's name, size,
    mtime and checksum). One 512-byte read; a shard replaced by another of the same size differs here. Raises
    OSError."""
    import hashlib

    fd = os.open(path, os.O_RDONLY)
    try:
        return hashlib.sha256(os.pread(fd, HEAD_BYTES, 0)).hexdigest()[:16]
    finally:
        os.close(fd)


def index_shard(path: str | os.PathLike) -> ShardIndex:
    """Index one webdataset tar: headers + small text members only (image payloads are seeked over)."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"{path}: cannot index shard ({e.strerror})") from None
    samples: list[tuple[str, dict[str, tuple[int, int]], dict[str, str]]] = []
    try:
        head = head_digest(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror or e})") from None
    gen = walk_tar(path)
    bytes_read = 0
    try:
        while True:
            name, off, size, text = next(gen)
            split = member_key(name)
            if split is None:
                continue  # hidden or extension-less files are not samples (as in webdataset)
            key, ext = split
            if not samples or samples[-1][0] != key:
                samples.append((key, {}, {}))
            samples[-1][1][ext] = (off, size)
            if text is not None:
                samples[-1][2][ext] = text.decode("utf-8", errors="replace")
    except StopIteration as stop:
        bytes_read = stop.value or 0
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror or e})") from None
    n = len(samples)
    img_off = np.full(n, -1, np.int64)
    img_size = np.zeros(n, np.int64)
    img_ext = np.full(n, -1, np.int8)
    txt_off = np.full(n, -1, np.int64)
    txt_size = np.zeros(n, np.int64)
    taxon = np.full(n, -1, np.int32)
    captions = np.full((len(TEXT_TYPES), n), -1, np.int32)
    taxa: list[dict[str, str]] = []
    taxa_ids: dict[Taxon, int] = {}
    strings: list[str] = []
    string_ids: dict[str, int] = {}
    for j, (_, members, texts) in enumerate(samples):
        for e_i, e in enumerate(IMAGE_EXTS):
            if e in members:
                img_off[j], img_size[j] = members[e]
                img_ext[j] = e_i
                break
        if "txt" in members:
            txt_off[j], txt_size[j] = members["txt"]
        t = taxon_from_texts(texts)
        if t is not None:
            if t not in taxa_ids:
                taxa_ids[t] = len(taxa)
                taxa.append(t.to_dict())
            taxon[j] = taxa_ids[t]
        for ti, member in enumerate(CAPTION_MEMBERS):
            s = texts.get(member)
            if s is None:
                continue
            s = " ".join(s.split())
            if not s:
                continue
            if s not in string_ids:
                string_ids[s] = len(strings)
                strings.append(s)
            captions[ti, j] = string_ids[s]
    return ShardIndex(os.path.basename(path), int(st.st_size), int(st.st_mtime_ns), [s[0] for s in samples],
                      img_off, img_size, img_ext, txt_off, txt_size, taxon, taxa, captions, strings,
                      bytes_read=bytes_read, head=head)


# ---------------------------------------------------------------------------------------------------------------------
# a directory's index: sidecars + manifest
# ---------------------------------------------------------------------------------------------------------------------
def sidecar_path(index_dir: str | os.PathLike, shard_name: str) -> Path:
    return Path(index_dir) / (shard_name + SIDECAR_SUFFIX)


def load_index_manifest(index_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(index_dir) / INDEX_MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DataError(f"{path}: cannot read the shard index manifest ({e.strerror})") from None
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: corrupt shard index manifest ({e}); re-run index-shards") from None
    if m.get("format") != INDEX_FORMAT:
        raise DataError(f"{path}: unknown index format {m.get('format')!r} (expected {INDEX_FORMAT}); "
                        "re-run index-shards")
    return m


def _sidecar_is_current(path: Path, st: os.stat_result) -> bool:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
    except Exception:  # noqa: BLE001 - any unreadable sidecar is rebuilt
        return False
    return (meta.get("format") == INDEX_FORMAT and meta.get("size") == st.st_size
            and meta.get("mtime_ns") == st.st_mtime_ns and meta.get("text_types") == list(TEXT_TYPES))


def _index_task(args: tuple[str, str]) -> tuple[str, int, int, dict[str, Any] | str]:
    """One shard: (path, samples, bytes read, summary), or a damaged shard's reason in place of the summary (a long
    indexing job skips and lists damaged shards instead of losing the others)."""
    path, out = args
    try:
        idx = index_shard(path)
    except DataError as e:
        return path, 0, 0, str(e)
    idx.save(out)
    return path, idx.count, idx.bytes_read, summarize(idx)


def summarize(idx: ShardIndex) -> dict[str, Any]:
    """What the manifest (and a rank exchange) records of one shard."""
    return {"name": idx.name, "count": idx.count, "size": idx.size, "mtime_ns": idx.mtime_ns, "head": idx.head,
            "taxa": idx.taxa,
            "taxon_counts": np.bincount(idx.taxon[idx.taxon >= 0], minlength=len(idx.taxa)).tolist()}


def build_manifest(summaries: Sequence[dict[str, Any]], *, paths: Sequence[str] | None = None) -> dict[str, Any]:
    """Manifest of shard summaries: global classes (sorted by label) and each shard's class ids."""
    classes: dict[str, dict[str, str]] = {}
    counts: dict[str, int] = {}
    for s in summaries:
        for t, c in zip(s["taxa"], s.get("taxon_counts", [0] * len(s["taxa"]))):
            lab = Taxon.from_row(t).label
            classes.setdefault(lab, t)
            counts[lab] = counts.get(lab, 0) + int(c)
    labels = sorted(classes)
    cid = {lab: i for i, lab in enumerate(labels)}
    shards = []
    for i, s in enumerate(summaries):
        entry = {"name": s["name"], "count": s["count"], "size": s["size"], "mtime_ns": s["mtime_ns"],
                 "head": s.get("head", ""), "classes": sorted({cid[Taxon.from_row(t).label] for t in s["taxa"]})}
        if paths is not None:
            entry["path"] = os.path.abspath(paths[i])
        shards.append(entry)
    return {"format": INDEX_FORMAT, "num_samples": sum(s["count"] for s in summaries), "num_classes": len(labels),
            "shards": shards, "classes": [{"label": lab, "count": counts[lab], **classes[lab]} for lab in labels]}


# ---------------------------------------------------------------------------------------------------------------------
# the binary class table
# ---------------------------------------------------------------------------------------------------------------------
def label_hashes(labels: Iterable[str]) -> np.ndarray:
    """Stable 64-bit hashes (blake2b) of class labels, as int64."""
    import hashlib

    return np.fromiter((int.from_bytes(hashlib.blake2b(lab.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                       "little", signed=True) for lab in labels), dtype=np.int64)


def _label_of(fields: Sequence[str]) -> str:
    """Taxon.label of a stored row (fields are stored cleaned, as Taxon.to_dict gives them)."""
    return " ".join(f for f in fields[:7] if f)


class ClassTable(Sequence):
    """The classes of an index, sorted by label: a Sequence of Taxon built on access, over memory-mapped arrays
    (nothing per class is materialized at open; the ranks of a node share the pages). `ids` selects a sorted subset
    of the table's classes (those of the shards a loader uses), renumbered 0..len-1."""

    CACHE_SIZE = 1 << 16  # Taxon objects kept (~20 MB)

    def __init__(self, arrays: dict[str, np.ndarray], ids: np.ndarray | None = None):
        self._a = arrays
        self._text, self._off = arrays["text"], arrays["offsets"]
        self.ids = ids
        self._n = int(len(arrays["counts"]) if ids is None else len(ids))
        self._cache: dict[int, Taxon] = {}
        self._source: tuple[str, dict[str, Any]] | None = None  # (index dir, manifest["class_table"]) when mapped

    def __reduce__(self):
        # a memory-mapped table travels by its files (a spawned worker maps them again), not as a copy of the arrays
        if self._source is not None:
            return _reopen_class_table, (self._source, self.ids)
        return ClassTable, (self._a, self.ids)

    @classmethod
    def open(cls, index_dir: str | os.PathLike, manifest: dict[str, Any]) -> "ClassTable":
        """The table a manifest names (memory-mapped); DataError when a file is missing or damaged."""
        info = manifest["class_table"]
        arrays = {}
        for key, name in info["files"].items():
            path = Path(index_dir) / name
            try:
                arrays[key] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: unreadable class table of the shard index ({type(e).__name__}: "
                                f"{getattr(e, 'strerror', None) or e}); re-run index-shards") from None
        n, f = int(info["num_classes"]), len(CLASS_FIELDS)
        if (info.get("format") != CLASS_TABLE_FORMAT or len(arrays["counts"]) != n
                or len(arrays["offsets"]) != n * f + 1 or len(arrays["hash_order"]) != n
                or int(arrays["offsets"][-1]) != len(arrays["text"])):
            raise DataError(f"{Path(index_dir) / INDEX_MANIFEST}: the class table does not match the manifest "
                            f"({n} classes); re-run index-shards")
        table = cls(arrays)
        table._source = (os.fspath(index_dir), info)
        return table

    def __len__(self) -> int:
        return self._n

    def _global(self, i: int) -> int:
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"class {i} outside [0, {self._n})")
        return int(self.ids[i]) if self.ids is not None else i

    def _fields(self, g: int) -> list[str]:
        f = len(CLASS_FIELDS)
        off = self._off[g * f: (g + 1) * f + 1].tolist()
        raw = self._text[off[0]:off[-1]].tobytes()
        base = off[0]
        return [raw[a - base:b - base].decode("utf-8", "surrogatepass") for a, b in zip(off, off[1:])]

    def row(self, i: int) -> dict[str, str]:
        """Class i as a metadata row (Taxon.from_row keys) with its sample `count`."""
        g = self._global(i)
        return {**dict(zip(CLASS_FIELDS, self._fields(g))), "label": _label_of(self._fields(g)),
                "count": int(self._a["counts"][g])}

    def label(self, i: int) -> str:
        return _label_of(self._fields(self._global(i)))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        i = int(i)
        t = self._cache.get(i)
        if t is None:
            if len(self._cache) >= self.CACHE_SIZE:  # bounded: a long run may touch most of 952k classes
                self._cache.clear()
            t = self._cache[i] = Taxon.from_row(dict(zip(CLASS_FIELDS, self._fields(self._global(i)))))
        return t

    def indices(self, labels: Sequence[str]) -> np.ndarray:
        """Class index of each label (int64); KeyError naming the first label this table lacks. Vectorized: hash,
        one searchsorted over the sorted hashes, then each candidate's label compared (hash collisions are scanned)."""
        hs = label_hashes(labels)
        order, sorted_h = self._a["hash_order"], self._a["hash_sorted"]
        pos = np.searchsorted(sorted_h, hs)
        out = np.empty(len(labels), np.int64)
        for k, (lab, h, p) in enumerate(zip(labels, hs.tolist(), pos.tolist())):
            g = -1
            while p < len(sorted_h) and int(sorted_h[p]) == h:
                cand = int(order[p])
                if _label_of(self._fields(cand)) == lab:
                    g = cand
                    break
                p += 1
            if g >= 0 and self.ids is not None:
                j = int(np.searchsorted(self.ids, g))
                g = j if j < len(self.ids) and int(self.ids[j]) == g else -1
            if g < 0:
                raise KeyError(lab)
            out[k] = g
        return out

    def shard_classes(self, k: int) -> np.ndarray:
        """Global class ids of the manifest's shard k."""
        o = self._a["shard_class_offsets"]
        return np.asarray(self._a["shard_classes"][int(o[k]):int(o[k + 1])])

    def subset(self, ids: np.ndarray) -> "ClassTable":
        sub = ClassTable(self._a, np.asarray(ids, dtype=np.int64))
        sub._source = self._source
        return sub


def _reopen_class_table(source: tuple[str, dict[str, Any]], ids: np.ndarray | None) -> ClassTable:
    table = ClassTable.open(source[0], {"class_table": source[1]})
    return table if ids is None else table.subset(ids)


def class_arrays(classes: Sequence[dict[str, Any]], shard_classes: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """The class table's arrays from build_manifest's class rows (sorted by label) and each shard's class ids."""
    enc = [str(c.get(f) or "").encode("utf-8", "surrogatepass") for c in classes for f in CLASS_FIELDS]
    offsets = np.zeros(len(enc) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, enc), np.int64, count=len(enc)), out=offsets[1:])
    hashes = label_hashes(c["label"] for c in classes)
    order = np.argsort(hashes, kind="stable")
    sc_off = np.zeros(len(shard_classes) + 1, np.int64)
    np.cumsum([len(x) for x in shard_classes], out=sc_off[1:])
    return {"text": np.frombuffer(b"".join(enc), np.uint8), "offsets": offsets,
            "counts": np.asarray([int(c["count"]) for c in classes], np.int64),
            "hash_sorted": hashes[order], "hash_order": order.astype(np.int64),
            "shard_classes": (np.concatenate([np.asarray(x, np.int32) for x in shard_classes]) if len(shard_classes)
                              else np.zeros(0, np.int32)),
            "shard_class_offsets": sc_off}


def save_class_table(out: str | os.PathLike, manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[Path]:
    """Write the class table's arrays as .npy files under a fresh token (a reader of the previous manifest keeps its
    own files until the manifest is replaced) and name them in `manifest["class_table"]`. Returns the files."""
    import uuid

    out = Path(out)
    token = uuid.uuid4().hex[:12]
    files, written = {}, []
    for key, arr in arrays.items():
        path = out / f"{INDEX_MANIFEST.rsplit('.', 1)[0]}.{token}.{key}.npy"
        atomic_save(path, lambda tmp: _save_npy(tmp, arr), mkdir=False)
        files[key] = path.name
        written.append(path)
    manifest["class_table"] = {"format": CLASS_TABLE_FORMAT, "num_classes": int(len(arrays["counts"])),
                               "files": files}
    return written


def _save_npy(tmp: Path, arr: np.ndarray) -> None:
    with open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def write_index_manifest(out: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Write `manifest` (as build_manifest returns it) into `out`: its class list and per-shard class lists as the
    binary class table, then the small JSON, atomically; class-table files of earlier manifests are removed once the
    new one is in place."""
    out = Path(out)
    arrays = class_arrays(manifest.pop("classes"), [s.pop("classes") for s in manifest["shards"]])
    written = {p.name for p in save_class_table(out, manifest, arrays)}
    atomic_write_json(out / INDEX_MANIFEST, manifest, mkdir=False, separators=(",", ":"))
    stem = INDEX_MANIFEST.rsplit(".", 1)[0] + "."
    for old in out.glob(stem + "*.npy"):
        if old.name not in written:
            try:
                old.unlink()
            except OSError:
                pass


def load_class_table(index_dir: str | os.PathLike, manifest: dict[str, Any] | None = None) -> ClassTable:
    """The class table of the index in `index_dir`, memory-mapped. A manifest of an older version (its classes in
    the JSON) still loads: the table is then built in memory from those."""
    m = manifest if manifest is not None else load_index_manifest(index_dir)
    if m is None:
        raise DataError(f"{index_dir}: no shard index ({INDEX_MANIFEST}); run `bioclip-fast index-shards`")
    if "class_table" in m:
        return ClassTable.open(index_dir, m)
    return ClassTable(class_arrays(m["classes"], [s.get("classes", []) for s in m["shards"]]))


def index_shards(shards, out: str | os.PathLike | None = None, *, workers: int = 1, progress: bool = True,
                 resume: bool = True, merge: bool = True) -> dict[str, Any]:
    """Index every shard of a spec (see `shardspec`) into sidecars + `bioclip_index.json`; returns a summary.

    `out`: index directory (default: the shards' directory, which must then be the same for all shards).
    Resumable: shards whose sidecar matches their size and mtime are not read again. With `merge`, entries of
    other shards already in the directory's manifest are kept (a dataset indexed in parts).
    """
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    from bioclip_fast.data.shardspec import resolve_shards

    paths = resolve_shards(shards, name="index-shards")
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"index-shards: two shards are both named {dup!r}; index each directory separately")
    if out is None:
        dirs = {os.path.dirname(os.path.abspath(p)) for p in paths}
        if len(dirs) != 1:
            raise DataError(f"index-shards: the shards lie in {len(dirs)} directories; pass --out DIR")
        out = dirs.pop()
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test.", delete=True)
        probe.close()
    except OSError as e:
        raise DataError(f"index-shards: cannot write the index to {out} ({e.strerror}); pass --out with a writable "
                        "cache directory") from None
    t0 = time.perf_counter()
    stats = [os.stat(p) for p in paths]
    todo = [(p, str(sidecar_path(out, n))) for p, n, st in zip(paths, names, stats)
            if not (resume and _sidecar_is_current(sidecar_path(out, n), st))]
    bytes_read = 0
    fresh: dict[str, dict[str, Any]] = {}
    pbar = tqdm(total=len(todo), desc="index-shards", unit="shard", disable=not progress)
    try:
        if workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(min(workers, len(todo))) as pool:
                for p, _, b, s in pool.map(_index_task, todo, chunksize=max(1, len(todo) // (workers * 8))):
                    bytes_read += b
                    fresh[p] = s
                    pbar.update(1)
        else:
            for t in todo:
                p, _, b, s = _index_task(t)
                bytes_read += b
                fresh[p] = s
                pbar.update(1)
    finally:
        pbar.close()
    damaged = {p: s for p, s in fresh.items() if isinstance(s, str)}
    if damaged and len(damaged) == len(paths):
        raise DataError(f"index-shards: no shard could be indexed; e.g. {next(iter(damaged.values()))}")
    kept = [(p, n, st) for p, n, st in zip(paths, names, stats) if p not in damaged]
    paths, names, stats = [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]
    summaries = [fresh[p] if p in fresh else summarize(ShardIndex.load(sidecar_path(out, n)))
                 for p, n in zip(paths, names)]
    manifest = build_manifest(summaries, paths=paths)
    if damaged:
        manifest["damaged_shards"] = {os.path.basename(p): why for p, why in damaged.items()}
    # keep entries of other shards already indexed into this directory (indexing a dataset in parts)
    old = load_index_manifest(out) if resume and merge else None
    if old:
        manifest = _merge_manifests(old, manifest, out)
    write_index_manifest(out, manifest)
    total = sum(st.st_size for st in stats)
    todo = [t for t in todo if t[0] not in damaged]
    return {"index_dir": str(out), "shards": len(paths), "indexed": len(todo), "reused": len(paths) - len(todo),
            "damaged": {os.path.basename(p): why for p, why in damaged.items()},
            "samples": sum(s["count"] for s in summaries), "classes": manifest["num_classes"],
            "bytes_read": bytes_read, "shard_bytes": total,
            "bytes_read_fraction": bytes_read / max(1, sum(st.st_size for (p, _), st in
                                                           zip(todo, [os.stat(p) for p, _ in todo]))) if todo else 0.0,
            "seconds": round(time.perf_counter() - t0, 3)}


def _merge_manifests(old: dict[str, Any], new: dict[str, Any], out: Path) -> dict[str, Any]:
    new_names = {s["name"] for s in new["shards"]}
    keep = [s for s in old["shards"] if s["name"] not in new_names and sidecar_path(out, s["name"]).is_file()]
    if not keep:
        return new
    summaries, paths = [], []
    for s in keep:
        summaries.append(summarize(ShardIndex.load(sidecar_path(out, s["name"]))))
        paths.append(s.get("path", s["name"]))
    for s in new["shards"]:
        summaries.append(summarize(ShardIndex.load(sidecar_path(out, s["name"]))))
        paths.append(s.get("path", s["name"]))
    order = sorted(range(len(summaries)), key=lambda i: summaries[i]["name"])
    return build_manifest([summaries[i] for i in order], paths=[paths[i] for i in order])


def find_index(shard_paths: Sequence[str], index_dirs: Iterable[str | os.PathLike] = (), *,
               manifests: dict[str, dict[str, Any] | None] | None = None) -> dict[str, tuple[Path, dict]]:
    """{shard path: (index dir, manifest entry)} for shards covered by an index in `index_dirs` or next to them.

    Reads one manifest per directory (into `manifests`, {dir: manifest or None}, when given); stats nothing
    (staleness is checked when a shard is opened)."""
    manifests = {} if manifests is None else manifests
    candidates = [str(d) for d in index_dirs if d]
    found: dict[str, tuple[Path, dict]] = {}
    by_name_cache: dict[str, dict[str, dict]] = {}
    as_path: dict[str, Path] = {}

    def lookup(d: str, name: str) -> dict | None:
        if d not in manifests:
            manifests[d] = load_index_manifest(d)
        if manifests[d] is None:
            return None
        if d not in by_name_cache:
            by_name_cache[d] = {s["name"]: s for s in manifests[d]["shards"]}
            as_path[d] = Path(d)
        return by_name_cache[d].get(name)

    for p in shard_paths:  # 24k shards: no per-shard Path objects or abspath unless the shard's own dir is needed
        name = os.path.basename(p)
        for d in candidates:
            entry = lookup(d, name)
            if entry is not None:
                found[p] = (as_path[d], entry)
                break
        else:
            d = os.path.dirname(os.path.abspath(p))
            entry = lookup(d, name)
            if entry is not None:
                found[p] = (as_path[d], entry)
    return found
