"""`predict --rank species` against a TreeOfLife-sized species table: images/s, the table's share, peak RSS.

Writes a synthetic table the size of BioCLIP 2's (952k species x 768, float32 = 2.9 GB, plus a names JSON with
realistic repetition of ranks) to --tmp, runs the classifier in a child process over --images images (the bundled
butterflies, cycled) and measures:

- images/s end to end (decode + image encoder + table scoring + row formatting), and the time inside the table
  scoring (streamed chunks, running top-k, online log-sum-exp);
- peak RSS of the child (VmHWM), including the one-time parse of the names JSON into the compact cache;
- the image-encoder time per image of the run's model and, separately, of ViT-L/14 at 224 px (BioCLIP 2's encoder),
  so the table's overhead can be read against the real model (the target: < 20% of the encoder's time).

The run's model is a small 224 px ViT (2 layers, width 384, patch 32) with a 768-d embedding (the table's
dimension) and random weights, so 1,000+ images fit in minutes on 2 cores; the numbers are about cost, not accuracy.
RSS is reported whole (VmHWM, the peak: it includes ~0.8 GB of torch/open_clip shared libraries mapped at import) and as
private memory (RssAnon) at the end. The table is deleted afterwards (--keep keeps it). Writes
`benchmarks/results/predict_<tag>.json` and `.png`; the JSON records the machine's load average.

    python benchmarks/bench_predict.py                      # 952k x 768 table, 1024 images
    python benchmarks/bench_predict.py --rows 20000 --images 40 --no-vitl --tag smoke
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bioclip_fast.sysinfo import cpu_name

BENCH_CFG = {  # a cheap 224 px image tower with BioCLIP 2's 768-d embedding; a slim text tower (unused here)
    "embed_dim": 768,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 384, "head_width": 64, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def write_table(folder: Path, rows: int, dim: int, dtype: str, seed: int = 0) -> dict:
    """txt_emb_species.npy ([dim, rows], entries N(0, 1/dim): columns of norm ~1) and txt_emb_species.json, written
    row by row with plain writes (a memmap would leave the table's pages in this process's RSS, and a child forked
    from it would report that as its own peak)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    dt = np.dtype(dtype)
    with open(folder / "txt_emb_species.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False,
                                                 "shape": (dim, rows)})
        for _ in range(dim):
            f.write((rng.standard_normal(rows, dtype=np.float32) / np.sqrt(dim)).astype(dt).tobytes())
    epithets = [f"epithet{j}" for j in range(40000)]
    with open(folder / "txt_emb_species.json", "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(rows):
            g = i // 4  # ~4 species per genus, ~20 genera per family, ...
            fam, order = g // 20, g // 600
            cls, phylum = order // 10, order // 80
            kingdom = ["Animalia", "Plantae", "Fungi", "Chromista", "Protozoa", "Bacteria", "Archaea"][phylum % 7]
            names = [kingdom, f"Phylum{phylum}", f"Class{cls}", f"Order{order}", f"Family{fam}", f"Genus{g}",
                     epithets[(i * 7919) % len(epithets)]]
            common = f"common name {i}" if i % 5 < 2 else ""
            f.write(("," if i else "") + json.dumps([names, common]))
        f.write("]")
    size = sum(p.stat().st_size for p in folder.iterdir())
    return {"seconds": round(time.perf_counter() - t0, 1), "bytes": size}


def image_list(n: int) -> list[str]:
    from bioclip_fast.data.bundled import butterflies_root

    files = sorted(str(p) for p in (butterflies_root() / "images").glob("*.jpg"))
    return [files[i % len(files)] for i in range(n)]


def rss_mb(key: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> None:
    """Runs in its own process so ru_maxrss is this workload's peak."""
    import torch

    from bioclip_fast.model import create_model
    from bioclip_fast.predict import TreeOfLifeClassifier
    from bioclip_fast.tol import TaxaNames

    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict = {"rss_after_imports_mb": round(rss_mb())}
    t0 = time.perf_counter()
    TaxaNames.from_json(Path(args.table) / "txt_emb_species.json")  # cold: parse + write the compact cache
    out["names_parse_s"] = round(time.perf_counter() - t0, 2)
    out["rss_after_names_mb"] = round(rss_mb())
    torch.manual_seed(0)
    model = create_model("bench-768", model_cfg=BENCH_CFG)
    clf = TreeOfLifeClassifier(model=model, tol_embeddings=args.table, device=args.device,
                               batch_size=args.batch_size, table_batch=args.table_batch)
    out["rss_after_load_mb"] = round(rss_mb())
    images = image_list(args.images)
    # warm-up batch (allocator, thread pools), not timed
    list(clf.iter_image_features(images[: args.batch_size]))
    clf.table.seconds = 0.0
    t0 = time.perf_counter()
    rows = clf.predict(images, "species", k=5)
    total = time.perf_counter() - t0
    out.update({
        "images": len(images), "rows": len(rows), "seconds": round(total, 2),
        "images_per_s": round(len(images) / total, 2),
        "table_s": round(clf.table.seconds, 2),
        "table_ms_per_image": round(1000 * clf.table.seconds / len(images), 2),
        "encoder_ms_per_image": round(1000 * (total - clf.table.seconds) / len(images), 2),
        # VmHWM: this process image's high-water mark (ru_maxrss would also count what the parent held at fork)
        "peak_rss_mb": round(rss_mb("VmHWM")),
        "rss_end_mb": round(rss_mb()), "rss_anon_end_mb": round(rss_mb("RssAnon")),
        "rss_file_end_mb": round(rss_mb("RssFile")),
        "model_mb": round(sum(p.numel() * p.element_size() for p in clf.model.parameters()) / 2**20),
        "device": str(clf.device), "threads": torch.get_num_threads(),
    })
    print("RESULT " + json.dumps(out), flush=True)


def vitl_encoder_ms(images: int, batch: int, threads: int | None) -> float:
    """ViT-L/14 image encoder at 224 px (BioCLIP 2), random weights, ms per image (one warm-up batch)."""
    import torch

    from bioclip_fast.model import create_model

    if threads:
        torch.set_num_threads(threads)
    model = create_model("ViT-L-14").eval()
    x = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        model.encode_image(x[:1])
        t0 = time.perf_counter()
        n = 0
        while n < images:
            model.encode_image(x)
            n += batch
    return 1000 * (time.perf_counter() - t0) / n


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = result["predict"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = ["table scoring\n(952k species)" if result["rows"] >= 900000 else "table scoring",
              "image encoder\n(run model)"]
    vals = [r["table_ms_per_image"], r["encoder_ms_per_image"]]
    if result.get("vitl14_encoder_ms_per_image"):
        labels.append("image encoder\nViT-L/14")
        vals.append(result["vitl14_encoder_ms_per_image"])
    a.bar(labels, vals, color=["tab:orange", "tab:blue", "tab:green"][: len(vals)])
    a.set_ylabel("ms per image")
    a.set_title(f"predict --rank species: {r['images_per_s']} img/s ({r['device']})")
    b.bar(["after names", "after load", "peak"], [r["rss_after_names_mb"], r["rss_after_load_mb"], r["peak_rss_mb"]])
    b.axhline(1536, color="red", ls="--", label="1.5 GB target")
    b.set_ylabel("RSS (MB)")
    b.legend()
    b.set_title(f"memory, load avg {result['load_average_before'][0]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=952_000, help="species in the synthetic table")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=10, help="encoder batch (pybioclip's default 10)")
    p.add_argument("--table-batch", type=int, default=256, help="images scored per pass over the table")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tmp", default="/tmp", help="where the synthetic table is written (and deleted)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default=None)
    p.add_argument("--keep", action="store_true", help="keep the synthetic table")
    p.add_argument("--no-vitl", action="store_true", help="skip the ViT-L/14 encoder timing")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--table", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.dim != BENCH_CFG["embed_dim"]:
        BENCH_CFG["embed_dim"] = args.dim
    result: dict = {
        "benchmark": "predict --rank species with a TreeOfLife-sized species table",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "rows": args.rows, "dim": args.dim, "dtype": args.dtype, "batch_size": args.batch_size,
        "table_batch": args.table_batch, "load_average_before": load_average(),
    }
    table = Path(args.tmp) / f"bioclip_fast_bench_tol_{os.getpid()}"
    cache = Path(args.tmp) / f"bioclip_fast_bench_cache_{os.getpid()}"
    try:
        result["table_write"] = write_table(table, args.rows, args.dim, args.dtype)
        print(f"wrote synthetic table {table} ({result['table_write']['bytes'] / 1e9:.2f} GB)", file=sys.stderr)
        cmd = [sys.executable, __file__, "--child", "--table", str(table), "--images", str(args.images),
               "--batch-size", str(args.batch_size), "--table-batch", str(args.table_batch)]
        for flag, val in (("--device", args.device), ("--threads", args.threads)):
            if val:
                cmd += [flag, str(val)]
        env = {**os.environ, "BIOCLIP_FAST_CACHE": str(cache)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        result["predict"] = json.loads(lines[-1][len("RESULT "):])
    finally:
        if not args.keep:
            shutil.rmtree(table, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    r = result["predict"]
    if not args.no_vitl and r["device"] == "cpu":
        result["vitl14_encoder_ms_per_image"] = round(vitl_encoder_ms(16, 8, args.threads), 1)
        result["table_overhead_vs_vitl14"] = round(r["table_ms_per_image"] / result["vitl14_encoder_ms_per_image"], 4)
    result["table_overhead_vs_run_encoder"] = round(r["table_ms_per_image"] / r["encoder_ms_per_image"], 4)
    result["load_average_after"] = load_average()
    tag = args.tag or f"{r['device'].split(':')[0]}_{args.rows // 1000}k"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"predict_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"predict_{tag}.png")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
