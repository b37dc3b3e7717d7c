"""Decode + augment throughput (img/s) of every image path on the same shards, in one run.

Backends (each: JPEG decode, random-resized-crop, resize to --image-size, normalize, a float batch at the end):

- loader-dali-mixed   `make_loader(backend="dali", device="cuda")`: nvJPEG ROI decode on the GPU (needs CUDA)
- reader-dali-mixed   plain DALI `fn.readers.webdataset` + `fn.decoders.image(device="mixed")` +
                      `fn.random_resized_crop` + `fn.crop_mirror_normalize` (the DALI ceiling; no resume/skip logic)
- loader-dali-cpu     `make_loader(backend="dali", device="cpu")`: DALI CPU operators
- reader-dali-cpu     the plain DALI reader pipeline on CPU
- loader-pil          `make_loader(backend="cpu")`: PIL with JPEG draft (DCT downscale) in DataLoader workers
- torchvision         webdataset + `torchvision.io.decode_jpeg` + `v2.RandomResizedCrop` + `Normalize` in workers

CPU results are also reported per core (img/s divided by the cores used). Writes
`benchmarks/results/decode_<tag>.json` and `.png`. Default data: the bundled butterfly shards (224 px JPEGs,
listed --repeat-shards times), cycled until --images images have been processed per backend.

    python benchmarks/bench_decode.py --image-size 224 --batch-size 128 --images 4000
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bioclip_fast.sysinfo import cpu_name


def _time_batches(make_iter, images: int, batch_size: int, sync) -> dict:
    """Run until `images` images are produced; the first batch (startup, worker spawn) is timed apart."""
    n = 0
    t_first = None
    t0 = time.perf_counter()
    it = make_iter()
    while n < images:
        try:
            batch = next(it)
        except StopIteration:
            it = make_iter()
            continue
        sync(batch)
        if t_first is None:
            t_first = time.perf_counter() - t0
            t0 = time.perf_counter()
            continue
        n += batch.shape[0]
    dt = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()  # stop this backend's pipeline/workers before the next one forks its own
    return {"images": n, "seconds": round(dt, 3), "img_per_s": round(n / dt, 1), "startup_s": round(t_first, 3)}


def bench_loader(shards, backend: str, device: str, args) -> dict:
    from bioclip_fast.data import make_loader

    loader = make_loader(shards, args.batch_size, image_size=args.image_size, backend=backend, device=device,
                         num_workers=args.workers, shuffle_buffer=1000, text_types=("taxonomic",))

    def make_iter():
        return (b["image"] for b in loader)

    def sync(x):
        if x.is_cuda:
            torch.cuda.synchronize()

    try:
        return _time_batches(make_iter, args.images, args.batch_size, sync)
    finally:
        loader.close()


def bench_dali_reader(shards, device: str, args) -> dict:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray

    gpu = device == "cuda"
    idx = [str(Path(s).with_suffix(".idx")) for s in shards]

    @pipeline_def(batch_size=args.batch_size, num_threads=args.workers, device_id=0 if gpu else None, seed=0,
                  prefetch_queue_depth=2)
    def pipe():
        jpegs = fn.readers.webdataset(paths=shards, index_paths=idx, ext=["jpg"], random_shuffle=True,
                                      initial_fill=1000, name="reader", missing_component_behavior="error")
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        images = fn.random_resized_crop(images, size=[args.image_size, args.image_size], random_area=[0.9, 1.0],
                                        interp_type=types.INTERP_CUBIC, antialias=True)
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255],
                                        std=[0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255])

    p = pipe()
    p.build()

    def make_iter():
        while True:
            (out,) = p.run()
            t = out.as_tensor()
            dst = torch.empty(t.shape(), dtype=torch.float32, device="cuda" if gpu else "cpu")
            feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream() if gpu else None)
            yield dst

    return _time_batches(make_iter, args.images, args.batch_size, lambda x: torch.cuda.synchronize() if gpu else None)


class _TorchvisionDataset(torch.utils.data.IterableDataset):
    def __init__(self, shards, size):
        self.shards, self.size = shards, size

    def __iter__(self):
        import webdataset as wds
        from torchvision.io import decode_jpeg
        from torchvision.transforms import v2

        tf = v2.Compose([v2.RandomResizedCrop(self.size, scale=(0.9, 1.0), antialias=True),
                         v2.ToDtype(torch.float32, scale=True),
                         v2.Normalize([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])])
        ds = wds.WebDataset(self.shards, shardshuffle=False, nodesplitter=wds.split_by_node,
                            workersplitter=wds.split_by_worker, empty_check=False)
        for s in ds:
            data = torch.frombuffer(bytearray(s["jpg"]), dtype=torch.uint8)
            yield tf(decode_jpeg(data))


def bench_torchvision(shards, args) -> dict:
    # every worker reads every shard once per pass when shards < workers; repeat the list so each gets some
    loader = torch.utils.data.DataLoader(_TorchvisionDataset(shards, args.image_size), batch_size=args.batch_size,
                                         num_workers=args.workers, persistent_workers=True,
                                         worker_init_fn=lambda _: torch.set_num_threads(1))
    it_holder = []

    def make_iter():
        it_holder[:] = [iter(loader)]
        return it_holder[0]

    try:
        return _time_batches(make_iter, args.images, args.batch_size, lambda x: None)
    finally:
        it_holder[0]._shutdown_workers()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default=None, help="shard dir/pattern (default: bundled train shards)")
    ap.add_argument("--repeat-shards", type=int, default=8,
                    help="list the shards this many times (the bundled set is small; longer epochs keep GPU "
                         "pipelines from draining at every epoch boundary)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--images", type=int, default=4000, help="images per backend after the first batch")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode processes / DALI threads")
    ap.add_argument("--backends", default="all", help="comma list, or 'all'")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default=None, help="result name: decode_<tag>.json (default: gpu model or 'cpu')")
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'shared with other jobs')")
    args = ap.parse_args(argv)

    from bioclip_fast.data.bundled import default_shards
    from bioclip_fast.data.decode_dali import dali_import_error
    from bioclip_fast.data.shards import resolve_shards

    torch.set_num_threads(1)
    shards = resolve_shards(args.shards) if args.shards else default_shards("train", progress=True)
    if args.repeat_shards < 1:
        ap.error("--repeat-shards must be >= 1")
    shards = shards * args.repeat_shards
    cuda = torch.cuda.is_available()
    dali_err = dali_import_error()
    plan = {
        "loader-dali-mixed": (lambda: bench_loader(shards, "dali", "cuda", args), "gpu"),
        "reader-dali-mixed": (lambda: bench_dali_reader(shards, "cuda", args), "gpu"),
        "loader-dali-cpu": (lambda: bench_loader(shards, "dali", "cpu", args), "cpu"),
        "reader-dali-cpu": (lambda: bench_dali_reader(shards, "cpu", args), "cpu"),
        "loader-pil": (lambda: bench_loader(shards, "cpu", "cpu", args), "cpu"),
        "torchvision": (lambda: bench_torchvision(shards, args), "cpu"),
    }
    wanted = list(plan) if args.backends == "all" else [b.strip() for b in args.backends.split(",")]
    unknown = [b for b in wanted if b not in plan]
    if unknown:
        ap.error(f"unknown backends {unknown}; choose from {list(plan)}")

    gpu_name = torch.cuda.get_device_name(0) if cuda else None
    load_before = os.getloadavg()
    results = {}
    from tqdm import tqdm

    for name in tqdm(wanted, desc="bench-decode", unit="backend"):
        gc.collect()
        fn_, kind = plan[name]
        if kind == "gpu" and not cuda:
            results[name] = {"skipped": "no CUDA device"}
            continue
        if "dali" in name and dali_err:
            results[name] = {"skipped": f"DALI unavailable: {dali_err}"}
            continue
        try:
            r = fn_()
        except Exception as e:  # noqa: BLE001 - one failing backend must not lose the others' numbers
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        r["device"] = gpu_name if kind == "gpu" else f"{args.workers} CPU cores"
        if kind == "cpu":
            r["img_per_s_per_core"] = round(r["img_per_s"] / args.workers, 1)
        results[name] = r
        tqdm.write(f"{name:20s} {r['img_per_s']:10.1f} img/s")

    tag = args.tag or (gpu_name.replace(" ", "_") if gpu_name else "cpu")
    record = {
        "benchmark": "decode",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_cores_visible": os.cpu_count(),
        "gpu": gpu_name,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "shards": len(shards),
        "repeat_shards": args.repeat_shards,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "note": args.note,
        # other processes on the machine skew CPU numbers; the 1-minute load average says how much
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"decode_{tag}.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(record, out / f"decode_{tag}.png")
    print(json.dumps({k: v.get("img_per_s", v.get("skipped", v.get("error"))) for k, v in results.items()}))
    return 0


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k, v in record["results"].items() if "img_per_s" in v]
    vals = [record["results"][k]["img_per_s"] for k in names]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * max(1, len(names))))
    ax.barh(names, vals, color=["tab:green" if "mixed" in n else "tab:blue" for n in names])
    for y, (name, v) in enumerate(zip(names, vals)):
        per_core = record["results"][name].get("img_per_s_per_core")
        ax.text(v, y, f" {v:,.0f}" + (f"  ({per_core:,.0f}/core)" if per_core else ""), va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images / s")
    dev = record["gpu"] or record["cpu"]
    load = record["load_average_1m"]
    ax.set_title(f"decode + crop + normalize, {record['image_size']} px, batch {record['batch_size']}\n{dev}, "
                 f"{record['workers']} workers, {record['date'][:10]}, load avg {load['before']}-{load['after']}",
                 fontsize=9)
    ax.set_xlim(0, max(vals + [1]) * 1.45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
