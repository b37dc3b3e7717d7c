"""Shard index and read path on synthetic TreeOfLife-200M-layout shards (written to a temp dir, deleted after).

Measures, on --shards foreign shards (no manifest of ours; `.jpg` of realistic ~20-40 KB + the ten text members):

- startup without an index: `ShardSet(spec)` indexes every shard's headers + text members in-process (one rank);
- `index-shards` (header walk, --workers processes): seconds and bytes read as a fraction of shard bytes, from our
  reader's counter and from /proc/self/io (rchar) of the indexing processes;
- startup with an index: `ShardSet(spec)` reading only `bioclip_index.json` (target < 2 s for 2,000 shards);
- the old path for reference: a full read of every shard (`iter_shard_samples`, image bytes included), on a subset;
- the per-sample read path (locate -> read bytes -> label + captions, no decode) in samples/s per process through
  `BatchReader.read_positions(decode=False)`, on 10 shards x 1,000 samples and 60 shards x 100 samples (the issue's
  two cases), plus `Loader.tokens` (caption strings -> token rows) per sample.

Writes benchmarks/results/index_cpu.json + .png (index/startup) and readpath_cpu.json + .png (read path beside the
decode rates of benchmarks/results/decode_cpu_*.json). Files are in the page cache (just written): warm-cache
numbers; the load average is recorded.

`--startup-scale` measures instead the per-rank startup at the real scale: `make_loader(spec, index_dir=…)` over
24,236 shards and a 952,000-class table (an index written synthetically: the manifest + class table exactly as
`index-shards` writes them, empty shard files; no tar is written or opened), each case in a fresh process: seconds
for the call and the process's peak RSS (ru_maxrss) and RSS growth, for the binary class table and, for reference,
the previous JSON class table at the issue's size (2,000 shards, 952k classes). Writes
benchmarks/results/index_startup_<tag>.json.

    python benchmarks/bench_index.py                       # 2,000 shards x 5 samples (~0.45 GB in /tmp)
    python benchmarks/bench_index.py --startup-scale       # 24,236 shards, 952k classes (~0.4 GB in /tmp)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bioclip_fast.sysinfo import cpu_name


RESULTS = Path(__file__).resolve().parent / "results"
FULL_SET = 24236  # TreeOfLife-200M shards


def rchar() -> int:
    try:
        for line in open("/proc/self/io"):
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _index_in_child(spec: str, out: str, workers: int, q) -> None:
    from bioclip_fast.data.index import index_shards

    r0 = rchar()
    t0 = time.perf_counter()
    summary = index_shards(spec, out, workers=workers, progress=False, resume=False)
    summary["wall_s"] = time.perf_counter() - t0
    summary["rchar_main"] = rchar() - r0
    q.put(summary)


def bench_index(root: Path, args) -> dict:
    import multiprocessing as mp

    from bioclip_fast.data.shard_set import ShardSet
    from bioclip_fast.data.shards import iter_shard_samples
    from bioclip_fast.data.synthetic import write_tol_shards

    t0 = time.perf_counter()
    paths = write_tol_shards(root, args.shards, args.per_shard, payload="realistic")
    write_s = time.perf_counter() - t0
    total = sum(p.stat().st_size for p in paths)
    jpg_bytes = 0
    for s in iter_shard_samples([str(p) for p in paths[:20]]):
        jpg_bytes += len(s["jpg"])
    jpg_frac = jpg_bytes / sum(p.stat().st_size for p in paths[:20])
    spec = str(root / ("shard-{000000..%06d}.tar" % (args.shards - 1)))
    out: dict = {"shards": args.shards, "samples_per_shard": args.per_shard, "shard_bytes": total,
                 "mean_shard_bytes": total / args.shards, "jpg_fraction_of_bytes": round(jpg_frac, 4),
                 "write_s": round(write_s, 2), "spec": "shard-{000000..%06d}.tar" % (args.shards - 1)}

    # startup without an index (one process indexes everything; ranks would split this by world size)
    r0 = rchar()
    t0 = time.perf_counter()
    ss = ShardSet(spec)
    out["startup_no_index_s"] = round(time.perf_counter() - t0, 3)
    out["startup_no_index_rchar_fraction"] = round((rchar() - r0) / total, 4)
    assert ss.num_samples == args.shards * args.per_shard

    # index-shards in a child (its rchar is its own), --workers processes
    idx_dir = root / "index-cache"
    q = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=_index_in_child, args=(spec, str(idx_dir), args.workers, q))
    p.start()
    summary = q.get()
    p.join()
    out["index"] = {"workers": args.workers, "seconds": round(summary["wall_s"], 3),
                    "bytes_read": summary["bytes_read"], "bytes_read_fraction": round(summary["bytes_read_fraction"], 4),
                    "samples": summary["samples"]}

    # startup with the index (reads bioclip_index.json only)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        ss = ShardSet(spec, index_dir=str(idx_dir))
        times.append(time.perf_counter() - t0)
        assert ss.indexed_at_startup == 0
    out["startup_with_index_s"] = round(min(times), 3)
    out["startup_with_index_s_all"] = [round(t, 3) for t in times]

    # the old path: a full read of each shard (what ShardSet did before the index), on a subset
    sub = [str(x) for x in paths[: args.full_read_subset]]
    r0 = rchar()
    t0 = time.perf_counter()
    n = sum(1 for _ in iter_shard_samples(sub))
    dt = time.perf_counter() - t0
    out["full_read_subset"] = {"shards": len(sub), "samples": n, "seconds": round(dt, 3),
                               "rchar_fraction": round((rchar() - r0) / sum(os.path.getsize(s) for s in sub), 3),
                               "per_shard_s": dt / len(sub)}
    return out


def bench_read_path(root: Path, args) -> dict:
    from bioclip_fast.data.index import index_shards
    from bioclip_fast.data.batch_reader import BatchReader, SourceConfig
    from bioclip_fast.data.loader import Loader
    from bioclip_fast.data.shard_set import ShardSet
    from bioclip_fast.data.synthetic import write_tol_shards

    res = {}
    for n_shards, per in ((10, 1000), (60, 100)):
        d = root / f"read-{n_shards}x{per}"
        write_tol_shards(d, n_shards, per, payload="realistic", seed=3)
        index_shards(str(d), progress=False)
        ss = ShardSet(str(d))
        cfg = SourceConfig(batch_size=256, image_size=224, train=True, seed=0, rank=0, world_size=1, shuffle=True,
                           shuffle_buffer=5000, drop_last=True, crop_scale=(0.9, 1.0), crop_ratio=(3 / 4, 4 / 3))
        reader = BatchReader(ss, cfg, decode=False)
        plan = reader.plan(0)
        nb = plan.n // cfg.batch_size
        reader.read_positions(0, list(range(cfg.batch_size)), (0, 0, 0), replace=True)  # warm the caches
        t0, c0 = time.perf_counter(), time.process_time()
        n = 0
        raws = []
        for b in range(nb):
            raw = reader.read_positions(0, list(range(b * 256, (b + 1) * 256)), (0, 0, b), replace=True)
            n += len(raw["key"])
            raws.append(raw)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        loads = ss.loads
        # captions -> token rows as the main process does per batch (tokenizing each distinct string once)
        ld = Loader.__new__(Loader)
        import open_clip

        ld.tokenizer, ld.text_types, ld.classes, ld.device = open_clip.get_tokenizer("ViT-B-32"), \
            ("taxonomic", "scientific", "common", "scientific_common", "taxonomic_common"), ss.classes, \
            __import__("torch").device("cpu")
        ld.stats = {"caption_fallback": 0}
        ld._token_row, ld._token_table = {}, None
        t1 = time.process_time()
        for raw in raws:
            ld.tokens(raw["label"], raw["captions"])
        dt_tok = time.process_time() - t1
        res[f"{n_shards}x{per}"] = {"shards": n_shards, "samples_per_shard": per, "samples": n,
                                    "seconds": round(dt, 3), "samples_per_s": round(n / dt, 1),
                                    "cpu_seconds": round(cpu, 3), "samples_per_cpu_s": round(n / cpu, 1),
                                    "shard_table_loads": loads, "tokens_samples_per_cpu_s": round(n / dt_tok, 1),
                                    "before_this_change_samples_per_s": 3100 if per == 1000 else 78}
        shutil.rmtree(d)
    return res


# ---------------------------------------------------------------------------------------------------- startup at scale
def _synthetic_index(root: Path, n_shards: int, n_classes: int, classes_per_shard: int, per_shard: int,
                     old_format: bool) -> str:
    """An index of n_shards (empty files) and n_classes as index-shards writes it (build_manifest's rows -> the
    binary table, or the previous format's JSON class list); returns the shard spec."""
    import numpy as np

    from bioclip_fast.data.index import INDEX_FORMAT, INDEX_MANIFEST, class_arrays, save_class_table
    from bioclip_fast.fileio import atomic_write_json

    root.mkdir(parents=True)
    names = [f"shard-{i:06d}.tar" for i in range(n_shards)]
    for n in names:
        (root / n).touch()
    rng = np.random.default_rng(0)
    # class c: its own genus/species under 1 of 400 families; rows sorted by label as build_manifest sorts them
    rows = []
    for c in range(n_classes):
        fam = c % 400
        rows.append({"kingdom": "Animalia", "phylum": f"Phylum{fam % 7}", "class": f"Class{fam % 31}",
                     "order": f"Order{fam % 97}", "family": f"Family{fam}", "genus": f"Genus{c // 3:06d}",
                     "species": f"species{c:07d}", "common_name": f"common name {c}" if c % 2 else ""})
    for r in rows:
        r["label"] = " ".join(r[k] for k in ("kingdom", "phylum", "class", "order", "family", "genus", "species"))
        r["count"] = 0
    rows.sort(key=lambda r: r["label"])
    # each shard holds classes_per_shard classes; together they cover every class
    per = [np.unique(np.concatenate([np.arange(k, n_classes, n_shards),
                                     rng.integers(0, n_classes, max(0, classes_per_shard - n_classes // n_shards))]))
           for k in range(n_shards)]
    for ids in per:
        for c in ids.tolist():
            rows[c]["count"] += 1
    shards = [{"name": n, "count": per_shard, "size": 0, "mtime_ns": 0, "head": "", "path": str(root / n)}
              for n in names]
    manifest = {"format": INDEX_FORMAT, "num_samples": per_shard * n_shards, "num_classes": n_classes,
                "shards": shards}
    if old_format:
        for e, ids in zip(shards, per):
            e["classes"] = ids.tolist()
        manifest["classes"] = rows
    else:
        save_class_table(root, manifest, class_arrays(rows, per))
    atomic_write_json(root / INDEX_MANIFEST, manifest, separators=(",", ":"))
    return str(root / ("shard-{000000..%06d}.tar" % (n_shards - 1)))


_STARTUP_CHILD = r"""
import json, sys, time
def rss():  # VmHWM: this process image's peak (ru_maxrss would carry the parent's peak over fork + exec)
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out
import open_clip, torch  # imports (the same for every case) before the measured call
from bioclip_fast.data import make_loader
tok = open_clip.get_tokenizer("ViT-B-32")
before = rss()
t0 = time.perf_counter()
ld = make_loader(sys.argv[1], 256, index_dir=sys.argv[2], tokenizer=tok, num_workers=0)
dt = time.perf_counter() - t0
after = rss()
t1 = time.perf_counter()
first = [ld.classes[i].label for i in (0, len(ld.classes) // 2, len(ld.classes) - 1)]
touch = time.perf_counter() - t1
print(json.dumps({"make_loader_s": round(dt, 3), "classes": len(ld.classes), "samples": ld.source.num_samples,
                  "shards": len(ld.source), "rss_before": before, "rss_after": after,
                  "rss_growth_bytes": after["VmRSS"] - before["VmRSS"],
                  "anon_growth_bytes": after["RssAnon"] - before["RssAnon"],
                  "peak_rss_bytes": after["VmHWM"], "peak_rss_before_call_bytes": before["VmHWM"],
                  "three_class_lookups_s": round(touch, 4)}))
"""


def bench_startup_scale(root: Path, args) -> dict:
    import subprocess

    # (name, shards in the index, old JSON format, shards the loader uses: all, or the first half (a class subset))
    cases = [("binary_full", FULL_SET, False, FULL_SET), ("binary_full_half_the_shards", FULL_SET, False, FULL_SET // 2),
             ("binary_issue_size", 2000, False, 2000), ("json_issue_size", 2000, True, 2000)]
    out: dict = {"classes": args.classes, "classes_per_shard": args.classes_per_shard,
                 "samples_per_shard": 10000, "cases": {}}
    for name, n_shards, old, used in cases:
        d = root / name
        t0 = time.perf_counter()
        spec = _synthetic_index(d, n_shards, args.classes, args.classes_per_shard, 10000, old)
        spec = spec.replace("%06d}" % (n_shards - 1), "%06d}" % (used - 1))
        gen_s = time.perf_counter() - t0
        runs = []
        for _ in range(args.repeats):
            r = subprocess.run([sys.executable, "-c", _STARTUP_CHILD, spec, str(d)], capture_output=True, text=True,
                               timeout=900)
            if r.returncode:
                raise SystemExit(f"{name}: {r.stderr[-2000:]}")
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        best = min(runs, key=lambda x: x["make_loader_s"])
        on_disk = sum(f.stat().st_size for f in d.iterdir() if not f.name.endswith(".tar"))
        out["cases"][name] = {"shards": n_shards, "shards_used": used, "format": "json" if old else "binary (.npy, memory-mapped)",
                              "index_bytes_on_disk": on_disk, "generate_s": round(gen_s, 1),
                              "make_loader_s": best["make_loader_s"],
                              "make_loader_s_all": [x["make_loader_s"] for x in runs],
                              "rss_growth_mb": round(best["rss_growth_bytes"] / 2**20, 1),
                              "anon_growth_mb": round(best["anon_growth_bytes"] / 2**20, 1),
                              "peak_rss_mb": round(best["peak_rss_bytes"] / 2**20, 1),
                              "peak_rss_before_call_mb": round(best["peak_rss_before_call_bytes"] / 2**20, 1),
                              "classes": best["classes"], "samples": best["samples"],
                              "three_class_lookups_s": best["three_class_lookups_s"]}
        shutil.rmtree(d)
    full = out["cases"]["binary_full"]
    out["targets"] = {"make_loader_s <= 2": full["make_loader_s"] <= 2.0,
                      "class table memory (peak RSS growth) <= 200 MB":
                          full["peak_rss_mb"] - full["peak_rss_before_call_mb"] <= 200}
    return out


def plot(index_res: dict, read_res: dict, tag: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    names = ["no index\n(in-process scan)", "with index", "index-shards\n(%d workers)" % index_res["index"]["workers"]]
    vals = [index_res["startup_no_index_s"], index_res["startup_with_index_s"], index_res["index"]["seconds"]]
    ax[0].bar(names, vals, color=["#c44", "#4a4", "#48c"])
    ax[0].axhline(2.0, ls="--", c="k", lw=1, label="target: < 2 s with an index")
    ax[0].set_ylabel("seconds")
    ax[0].set_title(f"{index_res['shards']} shards: startup and indexing")
    ax[0].legend()
    fr = [index_res["index"]["bytes_read_fraction"], index_res["full_read_subset"]["rchar_fraction"]]
    ax[1].bar(["index (headers +\ntext members)", "full read\n(old startup)"], [100 * f for f in fr],
              color=["#4a4", "#c44"])
    ax[1].set_ylabel("% of shard bytes read")
    ax[1].set_title("bytes read")
    fig.suptitle(f"bench_index ({tag}; load avg {index_res['load_avg'][0]:.2f})")
    fig.tight_layout()
    fig.savefig(RESULTS / f"index_{tag}.png", dpi=110)

    labels, vals = [], []
    for k, v in read_res["read_path"].items():
        labels.append(f"read path, {k} shards x samples (per CPU-s)")
        vals.append(v["samples_per_cpu_s"])
    for name, rate in read_res.get("decode_per_process", {}).items():
        labels.append(f"decode: {name} (per core)")
        vals.append(rate)
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(labels) + 1.5))
    n_read = len(read_res["read_path"])
    ax.barh(labels[::-1], vals[::-1], color=(["#4a4"] * n_read + ["#888"] * (len(labels) - n_read))[::-1])
    ax.axvline(20000, ls="--", c="k", lw=1, label="target: 20,000 samples/s per worker")
    ax.set_xscale("log")
    ax.set_xlabel("samples/s per process")
    ax.legend(loc="lower right")
    ax.set_title(f"read path (no decode) vs decode, per process ({tag}; load {read_res['load_avg'][0]:.2f})")
    fig.tight_layout()
    fig.savefig(RESULTS / f"readpath_{tag}.png", dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=2000)
    p.add_argument("--per-shard", type=int, default=5, help="samples per synthetic shard (real shards: 10,000)")
    p.add_argument("--workers", type=int, default=2, help="index-shards processes")
    p.add_argument("--full-read-subset", type=int, default=200, help="shards read in full for the old-path figure")
    p.add_argument("--tmp", default=None, help="where to write the synthetic shards (default: a new temp dir)")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--skip-read-path", action="store_true")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNGs from the JSON results")
    p.add_argument("--startup-scale", action="store_true",
                   help="measure make_loader startup at 24,236 shards and --classes classes (synthetic index)")
    p.add_argument("--classes", type=int, default=952_000)
    p.add_argument("--classes-per-shard", type=int, default=500, help="distinct classes per synthetic shard")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    if args.startup_scale:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        root = Path(tempfile.mkdtemp(prefix="bench_index_startup-", dir=args.tmp))
        try:
            res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "cpu_count": os.cpu_count(), "machine": cpu_name(), "load_avg_before": list(os.getloadavg()),
                   **bench_startup_scale(root, args), "load_avg": list(os.getloadavg())}
        finally:
            shutil.rmtree(root, ignore_errors=True)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"index_startup_{args.tag}.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return 0
    if args.plot_only:
        plot(json.loads((RESULTS / f"index_{args.tag}.json").read_text()),
             json.loads((RESULTS / f"readpath_{args.tag}.json").read_text()), args.tag)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    root = Path(tempfile.mkdtemp(prefix="bench_index-", dir=args.tmp))
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(), "machine": cpu_name()}
    try:
        meta["load_avg_before"] = list(os.getloadavg())
        res = bench_index(root / "tol", args)
        res.update(meta, load_avg=list(os.getloadavg()))
        scale = FULL_SET / res["shards"]
        res["extrapolated_24236_shards"] = {
            "note": "linear in shard count; real shards hold 10,000 samples, so per-shard work scales with samples",
            "startup_with_index_s": round(res["startup_with_index_s"] * scale, 2),
            "index_bytes_fraction": res["index"]["bytes_read_fraction"],
        }
        RESULTS.mkdir(exist_ok=True)
        read = {"read_path": {}, **meta}
        if not args.skip_read_path:
            read["read_path"] = bench_read_path(root, args)
            read["load_avg"] = list(os.getloadavg())
            for f in sorted(RESULTS.glob("decode_cpu_*.json")):
                d = json.loads(f.read_text())
                for name, r in d.get("results", {}).items() if isinstance(d.get("results"), dict) else []:
                    if isinstance(r, dict) and r.get("img_per_s_per_core"):
                        read.setdefault("decode_per_process", {})[f"{name} {f.stem[11:]}"] = r["img_per_s_per_core"]
            (RESULTS / f"readpath_{args.tag}.json").write_text(json.dumps(read, indent=1))
        (RESULTS / f"index_{args.tag}.json").write_text(json.dumps(res, indent=1))
        if read["read_path"]:
            plot(res, read, args.tag)
        print(json.dumps({"index": res, "read_path": read["read_path"]}, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
