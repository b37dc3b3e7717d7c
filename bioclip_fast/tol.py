"""The TreeOfLife species table (BioCLIP's ``embeddings/txt_emb_species.{npy,json}``), served without loading it.

* ``txt_emb_species.npy``: text embeddings ``[D, N]`` (float32 or float16; N ≈ 952k for BioCLIP 2, 2.9 GB in float32).
  It is never read whole: each scoring pass streams it in column chunks into one reused buffer (``pread``, so the
  file's pages stay in the page cache and out of the process's RSS) and keeps a running top-k and an online
  log-sum-exp, so the softmax over all N species is exact. On a GPU the table is uploaded once, chunk by chunk.
* ``txt_emb_species.json``: N entries ``[[kingdom, phylum, class, order, family, genus, species_epithet],
  common_name]``. Parsed once, entry by entry, into an ``[N, 8]`` int32 array of codes into one UTF-8 blob of the
  unique strings, cached as ``.npy`` files (memory-mapped) under ``$BIOCLIP_FAST_CACHE`` (default
  ``~/.cache/bioclip_fast``): tens of MB per process instead of a multi-GB list of Python strings.

Scores follow pybioclip exactly: probabilities are the softmax of ``exp(logit_scale) * image @ table`` over all
(or the subset's) species; species rows are the top-k; a higher rank sums the probabilities of its species above
``min_prob`` and keeps the top-k groups (ties in first-seen order, as ``heapq.nlargest``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bioclip_fast.errors import DataError, UsageError
from bioclip_fast.fileio import atomic_save, atomic_write_text

EMB_FILE = "txt_emb_species.npy"
NAMES_FILE = "txt_emb_species.json"
RANK_LABELS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
# get_label_data() / list-tol-taxa columns (pybioclip's create_classification_dict at species rank)
LABEL_COLUMNS = ("kingdom", "phylum", "class", "order", "family", "genus", "species_epithet", "species", "common_name")
_CACHE_VERSION = "1"


def find_table(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(npy, json)`` in ``path`` or ``path/embeddings`` (the layout of the TreeOfLife dataset repos)."""
    p = Path(path)
    if p.is_file() and p.name == EMB_FILE:
        p = p.parent
    if not p.exists():
        raise UsageError(f"--tol-embeddings {path}: no such directory")
    for d in (p, p / "embeddings"):
        if (d / EMB_FILE).is_file() and (d / NAMES_FILE).is_file():
            return d / EMB_FILE, d / NAMES_FILE
    raise UsageError(f"--tol-embeddings {path}: needs {EMB_FILE} and {NAMES_FILE} (in it or in its embeddings/)")


# --------------------------------------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------------------------------------
def _iter_json_array(path: Path, block: int = 1 << 22) -> Iterator[Any]:
    """The elements of a top-level JSON array, decoded one at a time from blocks of text (bounded memory)."""
    dec = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf = f.read(block)
        pos = 0
        while True:  # skip to '['
            while pos < len(buf) and buf[pos].isspace():
                pos += 1
            if pos < len(buf):
                break
            more = f.read(block)
            if not more:
                raise ValueError("empty file")
            buf, pos = more, 0
        if buf[pos] != "[":
            raise ValueError("not a JSON array")
        pos += 1
        eof = False
        while True:
            while pos < len(buf) and (buf[pos].isspace() or buf[pos] == ","):
                pos += 1
            if pos >= len(buf) or (not eof and len(buf) - pos < 65536):
                more = "" if eof else f.read(block)
                eof = eof or not more
                buf, pos = buf[pos:] + more, 0
                if not buf:
                    raise ValueError("the array is not closed")
                continue
            if buf[pos] == "]":
                return
            try:
                obj, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    raise
                more = f.read(block)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield obj
            pos = end


class TaxaNames:
    """N taxa as ``codes [N, 8]`` (7 ranks + common name) into a vocabulary of unique strings stored as one UTF-8
    blob with offsets. Random access decodes on demand; filters compare codes."""

    def __init__(self, codes: np.ndarray, offsets: np.ndarray, blob: np.ndarray):
        self.codes, self.offsets, self.blob = codes, offsets, blob
        self._lookup: dict[str, int] | None = None

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def string(self, code: int) -> str:
        a, b = int(self.offsets[code]), int(self.offsets[code + 1])
        return bytes(self.blob[a:b]).decode("utf-8")

    def entry(self, i: int) -> tuple[list[str], str]:
        """Entry ``i`` as in the JSON: ``([kingdom, ..., genus, species_epithet], common_name)``."""
        c = self.codes[int(i)]
        return [self.string(x) for x in c[:7]], self.string(int(c[7]))

    def classification(self, i: int, rank: int) -> dict[str, str]:
        """pybioclip's ``create_classification_dict(names[i], Rank(rank))``."""
        sci, common = self.entry(i)
        out: dict[str, str] = {}
        for r in range(rank + 1):
            if r == 6:
                out["species_epithet"] = sci[6]
                out["species"] = sci[-2] + " " + sci[-1]
            else:
                out[RANK_LABELS[r]] = sci[r]
        if rank == 6:
            out["common_name"] = common
        return out

    def code_of(self, value: str) -> int | None:
        if self._lookup is None:
            self._lookup = {self.string(i): i for i in range(len(self.offsets) - 1)}
        return self._lookup.get(value)

    def column_codes(self, rank: int) -> np.ndarray:
        return np.asarray(self.codes[:, rank])

    # ---- building ---------------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: str | os.PathLike, *, cache: bool = True) -> TaxaNames:
        path = Path(path)
        cache_dir = _cache_dir(path) if cache else None
        if cache_dir is not None and (cache_dir / "done").is_file():
            try:
                return cls(*(np.load(cache_dir / f"{n}.npy", mmap_mode="r") for n in ("codes", "offsets", "blob")))
            except (OSError, ValueError):
                pass  # a damaged cache is rebuilt
        vocab: dict[str, int] = {}
        rows: list[np.ndarray] = []
        chunk: list[list[int]] = []
        try:
            for i, item in enumerate(_iter_json_array(path)):
                try:
                    sci, common = item
                    sci = list(sci)
                    if len(sci) < 7:
                        sci = [""] * (7 - len(sci)) + sci
                    fields = [*sci[-7:], common or ""]
                    chunk.append([vocab.setdefault(str(s), len(vocab)) for s in fields])
                except (TypeError, ValueError):
                    raise DataError(f"{path}: entry {i} is not [[kingdom, ..., species_epithet], common_name]: "
                                    f"{str(item)[:80]}") from None
                if len(chunk) == 65536:
                    rows.append(np.asarray(chunk, dtype=np.int32))
                    chunk = []
        except (ValueError, UnicodeDecodeError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{path}: not a TreeOfLife names file ({e})") from None
        if chunk:
            rows.append(np.asarray(chunk, dtype=np.int32))
        codes = np.concatenate(rows) if rows else np.zeros((0, 8), np.int32)
        encoded = [s.encode("utf-8") for s in vocab]
        del vocab
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        del encoded
        names = cls(codes, offsets, blob)
        if cache_dir is not None:
            names._write_cache(cache_dir)
        return names

    def _write_cache(self, d: Path) -> None:
        try:
            for n in ("codes", "offsets", "blob"):
                atomic_save(d / f"{n}.npy", lambda tmp, a=getattr(self, n): np.save(tmp, a))
            atomic_write_text(d / "done", "ok\n")
        except OSError:
            pass  # a read-only cache is only slower


def _cache_dir(path: Path) -> Path | None:
    try:
        st = path.stat()
    except OSError:
        return None
    key = hashlib.sha1(f"{_CACHE_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
    root = Path(os.environ.get("BIOCLIP_FAST_CACHE") or Path.home() / ".cache" / "bioclip_fast")
    return root / "tol_names" / key


# --------------------------------------------------------------------------------------------------------------------
# embeddings + scoring
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Scores:
    """One scoring pass over the table for B images."""

    top_values: torch.Tensor  # [B, k] probabilities, descending
    top_indices: torch.Tensor  # [B, k] table columns
    groups: list[list[tuple[np.ndarray, np.ndarray]]] | None  # per image: (columns, probabilities) above min_prob


class SpeciesTable:
    """``txt_emb_species.npy`` + names. ``score(features, scale, k, min_prob)`` streams the table once."""

    def __init__(self, npy: str | os.PathLike, names: TaxaNames, *, device: str | torch.device = "cpu",
                 chunk: int = 32768, source: str | None = None):
        self.path = Path(npy)
        self.source = source or str(self.path.parent)
        try:
            mm = np.load(self.path, mmap_mode="r")
        except Exception as e:  # noqa: BLE001 - not an npy / truncated
            raise DataError(f"{self.path}: not a readable .npy array ({e})") from None
        if mm.ndim != 2 or mm.dtype not in (np.float16, np.float32):
            raise DataError(f"{self.path}: expected a [D, N] float16/float32 matrix, got {mm.dtype} {mm.shape}")
        if mm.shape[1] != len(names):
            raise DataError(f"{self.path}: {mm.shape[1]} embeddings but {len(names)} names in {NAMES_FILE}")
        if not mm.flags.c_contiguous:
            raise DataError(f"{self.path}: Fortran-ordered arrays are not supported; save it C-ordered")
        self.dim, self.n = int(mm.shape[0]), int(mm.shape[1])
        self.dtype = mm.dtype
        self._offset = int(mm.offset)
        del mm
        self.names = names
        self.device = torch.device(device)
        self.chunk = max(1, int(chunk))
        self.keep: np.ndarray | None = None  # sorted column indices of a subset (apply_filter), else all
        self._gpu: torch.Tensor | None = None
        self.seconds = 0.0  # time spent scoring (benchmarks)

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs) -> SpeciesTable:
        npy, js = find_table(path)
        return cls(npy, TaxaNames.from_json(js), source=str(path), **kwargs)

    def __len__(self) -> int:
        return self.n if self.keep is None else len(self.keep)

    # ---- subsets ----------------------------------------------------------------------------------------------
    def apply_filter(self, keep: Sequence[bool] | np.ndarray | None) -> None:
        if keep is None:
            self.keep = None
            return
        keep = np.asarray(keep, dtype=bool).reshape(-1)
        if len(keep) != self.n:
            raise ValueError("Invalid keep_embeddings values. "
                             f"This parameter should be a list containing {self.n} items.")
        if not keep.any():
            raise ValueError("the filter keeps no taxa")
        self.keep = np.flatnonzero(keep)

    def column(self, j: int) -> int:
        """Table column of position ``j`` in the current (possibly filtered) label list."""
        return int(j) if self.keep is None else int(self.keep[int(j)])

    # ---- reading ----------------------------------------------------------------------------------------------
    def _read(self, a: int, b: int, buf: np.ndarray) -> np.ndarray:
        """Columns ``a:b`` into ``buf[:, :b-a]`` with one pread per row (strided in the file)."""
        item = self.dtype.itemsize
        w = b - a
        out = buf[:, :w]
        with open(self.path, "rb", buffering=0) as f:
            fd = f.fileno()
            for d in range(self.dim):
                view = memoryview(out[d]).cast("B")
                got = os.preadv(fd, [view], self._offset + (d * self.n + a) * item)
                if got != w * item:
                    raise DataError(f"{self.path}: file is truncated")
        return out

    def _chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first column, [D, w] float32 tensor on the scoring device) over the whole table."""
        if self.device.type != "cpu":
            if self._gpu is None:
                dev = torch.empty((self.dim, self.n), dtype=torch.from_numpy(np.zeros(0, self.dtype)).dtype,
                                  device=self.device)
                buf = np.empty((self.dim, self.chunk), dtype=self.dtype)
                for a in range(0, self.n, self.chunk):
                    b = min(a + self.chunk, self.n)
                    dev[:, a:b].copy_(torch.from_numpy(np.ascontiguousarray(self._read(a, b, buf))))
                self._gpu = dev
            for a in range(0, self.n, self.chunk):
                yield a, self._gpu[:, a : a + self.chunk].float()
            return
        buf = np.empty((self.dim, self.chunk), dtype=self.dtype)
        for a in range(0, self.n, self.chunk):
            b = min(a + self.chunk, self.n)
            block = torch.from_numpy(self._read(a, b, buf))
            yield a, block.float() if block.dtype != torch.float32 else block

    def materialize(self) -> torch.Tensor:
        """The whole (filtered) table as one float32 tensor (small tables and subsets; the reference path)."""
        cols = [t[:, self._local_keep(a, t.shape[1])].clone() if self.keep is not None else t.clone()
                for a, t in self._chunks()]
        return torch.cat(cols, dim=1)

    def _local_keep(self, a: int, w: int) -> torch.Tensor:
        lo, hi = np.searchsorted(self.keep, [a, a + w])
        return torch.from_numpy(self.keep[lo:hi] - a)

    # ---- scoring ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, features: torch.Tensor, scale: float, *, k: int | None = 5,
              min_prob: float | None = None) -> Scores:
        """Softmax over the (filtered) table of ``scale * features @ table``: the top-``k`` (probabilities,
        columns) and, when ``min_prob`` is given, every column whose probability exceeds it."""
        import time

        t0 = time.perf_counter()
        feats = features.to(self.device, torch.float32)
        bsz = feats.shape[0]
        n = len(self)
        kk = n if k is None else max(1, min(int(k), n))
        top_v = torch.full((bsz, 0), -math.inf, device=self.device)
        top_i = torch.zeros((bsz, 0), dtype=torch.long, device=self.device)
        run_max = torch.full((bsz,), -math.inf, device=self.device)
        run_sum = torch.zeros(bsz, device=self.device)
        # candidates for rank grouping: p > min_prob needs logit > lse + log(min_prob) >= running max + log(min_prob);
        # gathered as (row, column, logit) with one nonzero per chunk (no per-image host syncs), pruned as max grows
        log_min = math.log(min_prob) if min_prob is not None and min_prob > 0 else -104.0  # fp32 exp underflow
        cand: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        n_cand = 0
        for a, block in self._chunks():
            cols = None
            if self.keep is not None:
                local = self._local_keep(a, block.shape[1])
                if len(local) == 0:
                    continue
                block = block[:, local.to(block.device)]
                cols = local.to(self.device) + a
            logits = scale * (feats @ block)  # [B, w]
            if cols is None:
                cols = torch.arange(a, a + logits.shape[1], device=self.device)
            m = torch.maximum(run_max, logits.max(dim=1).values)
            run_sum = run_sum * torch.exp(run_max - m) + torch.exp(logits - m[:, None]).sum(dim=1)
            run_max = m
            v, i = logits.topk(min(kk, logits.shape[1]), dim=1)
            top_v, idx = torch.cat([top_v, v], 1).topk(min(kk, top_v.shape[1] + v.shape[1]), dim=1)
            top_i = torch.cat([top_i, cols[i]], 1).gather(1, idx)
            if min_prob is not None:
                rr, cc = torch.nonzero(logits > (run_max + log_min)[:, None], as_tuple=True)
                cand.append((rr, cols[cc], logits[rr, cc]))
                n_cand += len(rr)
                if n_cand > 1 << 22:  # prune with the newer, larger running maxima
                    rr, cc, lg = (torch.cat(x) for x in zip(*cand))
                    keep = lg > (run_max + log_min)[rr]
                    cand, n_cand = [(rr[keep], cc[keep], lg[keep])], int(keep.sum())
        lse = run_max + torch.log(run_sum)
        top_p = torch.exp(top_v - lse[:, None])
        groups = None
        if min_prob is not None:
            if cand:
                rr, cc, lg = (torch.cat(x) for x in zip(*cand))
            else:
                rr = cc = torch.zeros(0, dtype=torch.long)
                lg = torch.zeros(0)
            p = torch.exp(lg - lse[rr]) if len(rr) else lg
            keep = p > min_prob if min_prob > 0 else p > 0
            rr, cc, p = rr[keep].cpu().numpy(), cc[keep].cpu().numpy(), p[keep].cpu().numpy()
            order = np.argsort(rr, kind="stable")
            bounds = np.searchsorted(rr[order], np.arange(bsz + 1))
            groups = [(cc[order[bounds[r]:bounds[r + 1]]], p[order[bounds[r]:bounds[r + 1]]]) for r in range(bsz)]
        self.seconds += time.perf_counter() - t0
        return Scores(top_p.cpu(), top_i.cpu(), groups)

    def group(self, columns: np.ndarray, probs: np.ndarray, rank: int, k: int | None) -> list[tuple[int, float]]:
        """pybioclip's format_grouped_probs: sum probabilities per taxon at ``rank`` (columns in table order), the
        top-``k`` groups as ``(a representative column, summed probability)``, ties in first-seen order."""
        if len(columns) == 0:
            return []
        order = np.argsort(columns, kind="stable")  # insertion order of pybioclip's loop = ascending column
        columns, probs = columns[order], probs[order].astype(np.float64)
        keys = np.asarray(self.names.codes[columns, : rank + 1])
        uniq, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        sums = np.bincount(inverse.reshape(-1), weights=probs, minlength=len(uniq))
        best = sorted(range(len(uniq)), key=lambda g: (-sums[g], first[g]))
        if k is not None:
            best = best[: max(int(k), 0)]
        return [(int(columns[first[g]]), float(sums[g])) for g in best]

    # ---- labels -----------------------------------------------------------------------------------------------
    def label_rows(self) -> Iterator[dict[str, str]]:
        for i in range(self.names.codes.shape[0]):
            yield self.names.classification(i, 6)

    def taxa_filter(self, rank: int, values: Sequence[str]) -> np.ndarray:
        """pybioclip's create_taxa_filter: a boolean mask of the taxa whose ``rank`` is one of ``values``;
        unknown values fail with pybioclip's message."""
        label = RANK_LABELS[rank]
        values = [str(v) for v in values]
        if rank == 6:  # "Genus epithet": compare (genus, epithet) code pairs
            g, e = self.names.column_codes(5), self.names.column_codes(6)
            mask = np.zeros(len(self.names), dtype=bool)
            unknown = []
            for v in values:
                parts = v.rsplit(" ", 1) if " " in v else None
                gc = self.names.code_of(parts[0]) if parts else None
                ec = self.names.code_of(parts[1]) if parts else None
                hit = (g == gc) & (e == ec) if gc is not None and ec is not None else None
                if hit is None or not hit.any():
                    unknown.append(v)
                else:
                    mask |= hit
        else:
            col = self.names.column_codes(rank)
            codes = [self.names.code_of(v) for v in values]
            unknown = [v for v, c in zip(values, codes) if c is None or not (col == c).any()]
            mask = np.isin(col, [c for c in codes if c is not None])
        if unknown:
            raise ValueError(f"Unknown {label} received: {', '.join(unknown)}. Only known {label} may be used.")
        return mask
