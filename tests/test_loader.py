import io
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from bioclip_fast.data import bundled, make_loader
from bioclip_fast.data.bundled import build_bundled_replay
from bioclip_fast.data.decode_dali import dali_import_error
from bioclip_fast.data.shards import iter_shard_samples, make_shards, read_dali_index, read_metadata
from bioclip_fast.errors import DataError
from bioclip_fast.taxonomy import TEXT_TYPES, Taxon

ROOT = bundled.butterflies_root()
S = 32  # small images keep the suite fast on 2 cores
TOKENIZER = open_clip.get_tokenizer("ViT-B-32")
needs_dali = pytest.mark.skipif(dali_import_error() is not None, reason=f"DALI unavailable: {dali_import_error()}")


def _rows(n_per_species):
    seen = Counter()
    out = []
    for r in read_metadata(ROOT / "metadata.csv"):
        if seen[r["species"]] < n_per_species:
            seen[r["species"]] += 1
            out.append(r)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    rows = _rows(6)  # 60 images, 10 species
    make_shards(ROOT, rows, tmp / "bio", samples_per_shard=16, workers=1, progress=False)
    shards = sorted(str(p) for p in (tmp / "bio").glob("shard-*.tar"))
    keys = [s["key"] for s in iter_shard_samples(shards)]
    taxa = {Path(r["image"]).stem: Taxon.from_row(r) for r in rows}
    build_bundled_replay(tmp / "replay", samples_per_shard=300)
    replay = sorted(str(p) for p in (tmp / "replay").glob("*.tar"))
    return {"tmp": tmp, "shards": shards, "keys": keys, "taxa": taxa, "replay": replay}


@pytest.fixture(scope="module")
def corrupt(data):
    """A copy of the shards with garbage bytes in one JPEG, a truncated-in-place JPEG and one whose scan header is
    invalid (only a full decode notices), the sidecar and .idx still valid; plus a foreign shard (no manifest, no
    index) with garbage, truncated and missing JPEGs and a sample without taxonomy."""
    d = data["tmp"] / "corrupt"
    shutil.copytree(Path(data["shards"][0]).parent, d)
    tar = d / "shard-000001.tar"
    idx = read_dali_index(tar.with_suffix(".idx"))
    buf = bytearray(tar.read_bytes())
    bad = []
    for j, mode in ((2, "garbage"), (9, "truncated"), (5, "bad-scan")):
        key, members = idx[j]
        off, size = members["jpg"]
        if mode == "garbage":
            buf[off:off + size] = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
        elif mode == "truncated":
            buf[off + size // 2:off + size] = bytes(size - size // 2)
        else:  # structurally fine (header parses, EOI present) but the decoder rejects it
            sos = bytes(buf[off:off + size]).find(b"\xff\xda")
            buf[off + sos + 5] = 9  # the scan names a component the frame does not have
        bad.append(key)
    tar.write_bytes(bytes(buf))

    foreign = data["tmp"] / "foreign"
    foreign.mkdir()
    good = []
    with tarfile.open(foreign / "laion-like-000000.tar", "w") as tf:
        def add(name, payload):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))

        for i, s in enumerate(iter_shard_samples(data["shards"][:1])):
            if i >= 10:
                break
            jpg = s["jpg"]
            if i == 3:
                jpg = b"GARBAGE" * 200
            elif i == 5:
                jpg = jpg[: len(jpg) // 2]  # a really truncated file
            else:
                good.append(s["key"])
            if i != 7:
                add(f"{s['key']}.jpg", jpg)
            else:
                good.remove(s["key"])  # sample without an image member
            texts = s["texts"] if i != 8 else {"txt": "a photo of something."}
            if i == 8:
                good.remove(s["key"])  # no taxonomy: cannot be labelled
            for k, v in texts.items():
                add(f"{s['key']}.{k}", v.encode())
    return {"shards": sorted(str(p) for p in d.glob("*.tar")), "bad": bad,
            "foreign": [str(foreign / "laion-like-000000.tar")], "foreign_good": good}


def _collect(loader, n=None):
    out = []
    for i, b in enumerate(loader):
        out.append(b)
        if n is not None and i + 1 == n:
            break
    return out


def _keys(batches):
    return [k for b in batches for k in b["key"]]


def test_batch_contents(data):
    loader = make_loader(data["shards"], 8, image_size=S, num_workers=0, backend="cpu")
    assert loader.backend == "cpu" and len(loader) == 60 // 8
    assert [t.label for t in loader.classes] == sorted({t.label for t in data["taxa"].values()})
    batches = _collect(loader)
    b = batches[0]
    assert b["image"].shape == (8, 3, S, S) and b["image"].dtype == torch.float32
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    pixels = b["image"] * std + mean
    assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4 and pixels.std() > 0.05
    assert set(b["text"]) == set(TEXT_TYPES)
    for i, key in enumerate(b["key"]):
        taxon = data["taxa"][key]
        assert loader.classes[int(b["label"][i])].label == taxon.label
        for tt in TEXT_TYPES:
            assert torch.equal(b["text"][tt][i], TOKENIZER([taxon.text(tt)])[0])
    assert loader.stats["samples"] == 56 and loader.stats["skipped_corrupt"] == 0


def test_eval_order_covers_every_sample_once(data):
    loader = make_loader(data["shards"], 7, image_size=S, num_workers=0, train=False, drop_last=False)
    batches = _collect(loader)
    assert _keys(batches) == data["keys"]  # no shuffle: archive order
    assert [len(b["key"]) for b in batches] == [7] * 8 + [4]
    # eval crops are deterministic: the center crop of the image
    again = _collect(make_loader(data["shards"], 7, image_size=S, num_workers=0, train=False, drop_last=False))
    assert torch.equal(batches[3]["image"], again[3]["image"])


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_sharding_covers_each_sample_once(data, world_size):
    per_rank = [_keys(_collect(make_loader(data["shards"], 4, image_size=S, num_workers=0, train=False,
                                           drop_last=False, rank=r, world_size=world_size)))
                for r in range(world_size)]
    assert sorted(k for ks in per_rank for k in ks) == sorted(data["keys"])
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    # training: shuffled, equal batch counts on every rank, still disjoint
    loaders = [make_loader(data["shards"], 4, image_size=S, num_workers=0, rank=r, world_size=world_size, seed=5)
               for r in range(world_size)]
    assert len({len(ld) for ld in loaders}) == 1
    train_keys = [_keys(_collect(ld)) for ld in loaders]
    flat = [k for ks in train_keys for k in ks]
    assert len(flat) == len(set(flat)) == world_size * len(loaders[0]) * 4


def test_shuffle_is_deterministic_per_seed_and_epoch(data):
    def run(seed, epoch):
        ld = make_loader(data["shards"], 6, image_size=S, num_workers=0, seed=seed, drop_last=False,
                         shuffle_buffer=20)
        ld.set_epoch(epoch)
        return _collect(ld)

    a, b = run(0, 0), run(0, 0)
    assert _keys(a) == _keys(b) and all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert sorted(_keys(a)) == sorted(data["keys"])
    assert _keys(a) != data["keys"]
    assert _keys(run(1, 0)) != _keys(a)
    assert _keys(run(0, 1)) != _keys(a)


def test_resume_mid_epoch_gives_exactly_the_remaining_samples(data):
    kw = dict(image_size=S, seed=3, shuffle_buffer=24, replay_shards=data["replay"], replay_batch_size=3)
    ref = make_loader(data["shards"], 8, num_workers=0, **kw)
    epoch0, epoch1 = _collect(ref), _collect(ref)
    assert ref.epoch == 1 and _keys(epoch0) != _keys(epoch1)

    first = make_loader(data["shards"], 8, num_workers=2, **kw)  # worker processes must not change the order
    head = _collect(first, 3)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batches_consumed"] == 3

    resumed = make_loader(data["shards"], 8, num_workers=2, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # a training loop calls this each epoch; a no-op for the restored epoch
    tail = _collect(resumed)
    assert _keys(head) + _keys(tail) == _keys(epoch0)
    for x, y in zip(head + tail, epoch0):
        assert torch.equal(x["image"], y["image"])
        assert x["replay"]["key"] == y["replay"]["key"]
        assert torch.equal(x["replay"]["image"], y["replay"]["image"])
    assert _keys(_collect(resumed)) == _keys(epoch1)  # and the next epoch continues the same sequence
    # the interrupted loader itself also continues where it stopped
    assert _keys(_collect(first)) == _keys(epoch0)[24:]

    other = make_loader(data["shards"], 4, num_workers=0, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


def test_corrupt_samples_are_skipped_and_counted(data, corrupt):
    good = [k for k in data["keys"] if k not in corrupt["bad"]]
    ev = make_loader(corrupt["shards"], 5, image_size=S, num_workers=0, train=False, drop_last=False)
    assert _keys(_collect(ev)) == good
    assert ev.stats["skipped_corrupt"] == 3 and sorted(ev.skipped_keys) == sorted(corrupt["bad"])

    tr = make_loader(corrupt["shards"], 5, image_size=S, num_workers=2, seed=1, drop_last=False)
    batches = _collect(tr)
    assert all(len(b["key"]) == 5 for b in batches)  # replacements keep the batch size fixed
    keys = _keys(batches)
    assert set(keys) == set(good) and not set(keys) & set(corrupt["bad"])
    assert tr.stats["skipped_corrupt"] >= 3

    fg = make_loader(corrupt["foreign"], 4, image_size=S, num_workers=0, train=False, drop_last=False)
    assert _keys(_collect(fg)) == corrupt["foreign_good"]
    assert fg.stats["skipped_corrupt"] == 4
    assert {t.label for t in fg.classes} <= {t.label for t in data["taxa"].values()}


def test_replay_part(data):
    ld = make_loader(data["shards"], 8, image_size=S, num_workers=0, replay_shards=data["replay"],
                     replay_batch_size=5, seed=2)
    batches = _collect(ld)
    captions = {s["key"]: s["texts"]["txt"] for s in iter_shard_samples(data["replay"])}
    seen = []
    for b in batches:
        r = b["replay"]
        assert r["image"].shape == (5, 3, S, S) and r["text"].shape == (5, 77) and len(r["key"]) == 5
        for i, k in enumerate(r["key"]):
            assert torch.equal(r["text"][i], TOKENIZER([captions[k]])[0])
        seen += r["key"]
    assert len(set(seen)) == len(seen)  # one replay stream, no repeats within its epoch
    assert ld.stats["replay_samples"] == 5 * len(batches)
    with pytest.raises(ValueError, match="replay needs both"):
        make_loader(data["shards"], 8, replay_shards=data["replay"])


def test_argument_errors(data):
    with pytest.raises(ValueError, match="backend"):
        make_loader(data["shards"], 8, backend="tpu")
    with pytest.raises(ValueError, match="rank"):
        make_loader(data["shards"], 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_loader(data["shards"], 100)
    with pytest.raises(DataError, match=r"\.nope': no such file or directory"):
        make_loader([data["shards"][0] + ".nope"], 8)
    with pytest.raises(ValueError, match="unknown text types"):
        make_loader(data["shards"], 8, text_types=("latin",))


@needs_dali
def test_dali_cpu_matches_cpu_backend(data, corrupt):
    kw = dict(image_size=S, num_workers=1, seed=4, replay_shards=data["replay"], replay_batch_size=4,
              device="cpu")
    dali = make_loader(data["shards"], 8, backend="dali", **kw)
    cpu = make_loader(data["shards"], 8, backend="cpu", **kw)
    assert dali.backend == "dali"
    a, b = _collect(dali), _collect(cpu)
    assert len(a) == len(b) == len(dali)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and torch.equal(x["label"], y["label"])
        assert x["image"].shape == y["image"].shape == (8, 3, S, S)
        # same crop boxes; only the two resamplers differ
        assert (x["image"] - y["image"]).abs().mean() < 0.08
        for tt in TEXT_TYPES:
            assert torch.equal(x["text"][tt], y["text"][tt])
        assert x["replay"]["key"] == y["replay"]["key"]
        assert (x["replay"]["image"] - y["replay"]["image"]).abs().mean() < 0.08
    # the next epoch reuses the reset pipelines and still follows the same plan
    pipes = dali._dali._pipes
    a2, b2 = _collect(dali), _collect(cpu)
    assert dali._dali._pipes is pipes and dali.epoch == 1
    assert _keys(a2) == _keys(b2) != _keys(a)
    assert [x["replay"]["key"] for x in a2] == [y["replay"]["key"] for y in b2]

    # host checks catch garbage/truncation; the bad scan fails inside DALI -> that batch is decoded on the CPU
    ev = make_loader(corrupt["shards"], 5, image_size=S, num_workers=0, train=False, drop_last=False,
                     backend="dali")
    assert _keys(_collect(ev)) == [k for k in data["keys"] if k not in corrupt["bad"]]
    assert ev.stats["skipped_corrupt"] == 3 and ev.stats["dali_fallback_batches"] == 1


@pytest.mark.gpu
@needs_dali
def test_dali_mixed_on_gpu_matches_cpu(data):
    gpu = make_loader(data["shards"], 8, image_size=S, num_workers=1, device="cuda", seed=6)
    assert gpu.backend == "dali"
    cpu = make_loader(data["shards"], 8, image_size=S, num_workers=1, backend="cpu", seed=6)
    for x, y in zip(_collect(gpu), _collect(cpu)):
        assert x["image"].is_cuda and x["text"]["taxonomic"].is_cuda
        assert x["key"] == y["key"]
        assert (x["image"].cpu() - y["image"]).abs().mean() < 0.08


def test_jpeg_structure_check(data):
    from bioclip_fast.data.decode_cpu import CorruptImage, image_size

    jpg = next(iter_shard_samples(data["shards"][:1]))["jpg"]
    assert image_size(jpg) == Image.open(io.BytesIO(jpg)).size
    assert image_size(jpg + b"\x00camera-trailer" * 100) == Image.open(io.BytesIO(jpg)).size  # data after EOI
    img = Image.open(io.BytesIO(jpg)).crop((0, 0, 150, 100))
    for fmt, kw in (("JPEG", {"progressive": True}), ("JPEG", {"exif": Image.Exif(), "quality": 50}),
                    ("PNG", {}), ("WEBP", {})):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        assert image_size(buf.getvalue()) == (150, 100), fmt
    for bad in (jpg[: len(jpg) * 2 // 3], b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, jpg[:10],
                jpg[:2] + b"\xff\xe0\xff\xff" + jpg[6:]):  # a segment length that overruns the file
        with pytest.raises(CorruptImage):
            image_size(bad)


def test_eval_keeps_last_batch_by_default_and_replay_needs_captions(data):
    ev = make_loader(data["shards"], 8, image_size=S, num_workers=0, train=False)
    assert ev.drop_last is False and len(ev) == 8 and len(_keys(_collect(ev))) == 60
    assert make_loader(data["shards"], 8, image_size=S, num_workers=0).drop_last is True
    with pytest.raises(DataError, match="no '.txt' caption member"):
        make_loader(data["shards"], 8, replay_shards=data["shards"], replay_batch_size=2)


@pytest.mark.parametrize("counts", [[10] * 7 + [3], [5], [100, 1, 1, 50]])
def test_epoch_plan_is_a_partition_and_mixes_shards(counts):
    from bioclip_fast.data.epoch_plan import EpochPlan

    for world_size in (1, 2, 3):
        for drop_last in (True, False):
            seen = []
            for rank in range(world_size):
                plan = EpochPlan(np.array(counts), seed=1, epoch=2, rank=rank, world_size=world_size, shuffle=True,
                                 shuffle_buffer=7, drop_last=drop_last)
                seen += plan.locate(range(plan.n))
            assert len(set(seen)) == len(seen)
            assert all(0 <= j < counts[s] for s, j in seen)
            assert len(seen) == (sum(counts) if not drop_last else sum(counts) // world_size * world_size)
    # class-sorted shards: the first 16 positions already come from all 8 shards
    plan = EpochPlan(np.array([100] * 8), seed=0, epoch=0, rank=0, world_size=1, shuffle=True, shuffle_buffer=16,
                     drop_last=True)
    assert len({s for s, _ in plan.locate(range(16))}) == 8


def test_crop_boxes_follow_torchvision_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop

    from bioclip_fast.data.decode_cpu import center_crop_box, random_resized_crop_box

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny torch ops: thread wake-ups dominate on a busy machine
    try:
        samples = {}
        for w, h, scale in ((224, 224, (0.9, 1.0)), (320, 240, (0.5, 1.0))):
            samples[w, h, scale] = (
                np.array([random_resized_crop_box(w, h, rng.random(40), scale) for _ in range(1000)]),
                np.array([RandomResizedCrop.get_params(torch.zeros(3, h, w), scale, (3 / 4, 4 / 3))
                          for _ in range(1000)])[:, [1, 0, 3, 2]],  # (i, j, h, w) -> (x, y, w, h)
            )
    finally:
        torch.set_num_threads(threads)
    for (w, h, scale), (ours, ref) in samples.items():
        assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= w).all()
        assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= h).all()
        for a in (ours, ref):
            a_area = a[:, 2] * a[:, 3] / (w * h)
            assert a_area.min() >= scale[0] - 0.01
        area = lambda a: (a[:, 2] * a[:, 3] / (w * h)).mean()  # noqa: E731
        assert abs(area(ours) - area(ref)) < 0.025  # > 3 standard errors; a wrong scale range is off by > 0.1
        assert abs(np.log(ours[:, 2] / ours[:, 3]).mean() - np.log(ref[:, 2] / ref[:, 3]).mean()) < 0.03
    assert center_crop_box(300, 200) == (50, 0, 200, 200)


# ---------------------------------------------------------------------------------------------------------------------
# shard index, captions from the shards' members, read path (issue 9 items 1-4)
# ---------------------------------------------------------------------------------------------------------------------
from tests._fixtures_data import TAXA, jpeg_bytes, write_tol_shard, write_tol_shards  # noqa: E402


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    """Foreign shards whose caption members disagree with what their taxonomy members would give (provider names,
    other common names), with some caption members missing (-> rebuilt from the taxonomy, counted)."""
    d = tmp_path_factory.mktemp("provider")
    samples, expect, dropped = [], {}, 0
    for i in range(24):
        t = TAXA[i % 4]
        s = {"key": f"p{i:03d}", "taxon": t, "jpg": jpeg_bytes(i)}
        want = {tt: t.text(tt) for tt in TEXT_TYPES}
        if i % 3 == 0:  # the provider's own names, as in ToL-200M's caption members
            s["override"] = {"com.txt": f"a photo of provider common name {i % 4}.",
                             "sci_com.txt": f"a photo of {t.scientific_name} with common name provider {i % 4}.",
                             "taxon.txt": f"a photo of {t.taxonomic_name} (accepted name {i}).",
                             "sci.txt": "a photo of  Danaus   plexippus."}  # whitespace normalized
            want.update(common=f"a photo of provider common name {i % 4}.",
                        scientific_common=f"a photo of {t.scientific_name} with common name provider {i % 4}.",
                        taxonomic=f"a photo of {t.taxonomic_name} (accepted name {i}).",
                        scientific="a photo of Danaus plexippus.")
        if i % 4 == 1:
            s["drop"] = ["taxon_com.txt", "com.txt"]
            want.update(taxonomic_common=t.text("taxonomic_common"), common=t.text("common"))
            dropped += 2
        samples.append(s)
        expect[s["key"]] = want
    write_tol_shard(d / "a.tar", samples[:12])
    write_tol_shard(d / "b.tar", samples[12:])
    return {"dir": d, "expect": expect, "dropped": dropped}


def test_captions_come_from_the_shard_members(provider):
    calls = []

    def tokenizer(texts):  # the real tokenizer, recording what it is asked to tokenize
        calls.extend(texts)
        return TOKENIZER(texts)

    ld = make_loader(str(provider["dir"]), 5, image_size=S, num_workers=0, train=False, tokenizer=tokenizer)
    seen = 0
    for b in ld:
        for tt in TEXT_TYPES:
            want = [provider["expect"][k][tt] for k in b["key"]]
            assert torch.equal(b["text"][tt], TOKENIZER(want)), tt
        seen += len(b["key"])
    assert seen == 24
    assert ld.stats["caption_fallback"] == provider["dropped"]
    # each distinct caption string tokenized once (tokenizer probes of the context length aside)
    texts = [c for c in calls if c != "x"]
    assert len(texts) == len(set(texts))
    assert set(texts) == {v for e in provider["expect"].values() for v in e.values()}


def test_loader_uses_the_index_and_never_scans(provider, tmp_path, monkeypatch):
    from bioclip_fast.data import index as index_mod
    from bioclip_fast.data.index import index_shards
    from bioclip_fast.data.shard_set import ShardSet

    cache = tmp_path / "cache"
    index_shards(str(provider["dir"]), cache, progress=False)

    def no_scan(path):
        raise AssertionError(f"shard {path} was scanned although an index exists")

    monkeypatch.setattr(index_mod, "index_shard", no_scan)
    ld = make_loader(str(provider["dir"]), 6, image_size=S, num_workers=0, train=False, index_dir=str(cache))
    assert ld.source.indexed_at_startup == 0 and len(ld.classes) == 4
    assert sum(len(b["key"]) for b in ld) == 24 and ld.stats["caption_fallback"] == provider["dropped"]
    monkeypatch.setenv("BIOCLIP_FAST_INDEX_DIR", str(cache))  # the cache dir through the environment
    assert ShardSet(str(provider["dir"])).indexed_at_startup == 0
    # a shard rewritten after indexing is refused with the fix, not read at wrong offsets
    monkeypatch.undo()
    shutil.copy(provider["dir"] / "a.tar", tmp_path / "a.tar")
    write_tol_shards(tmp_path / "other", 1, 2)
    shutil.copy(tmp_path / "other" / "shard-000000.tar", provider["dir"] / "a.tar")
    try:
        ss = ShardSet(str(provider["dir"]), index_dir=str(cache))
        with pytest.raises(DataError, match=r"a\.tar changed since it was indexed .* re-run `bioclip-fast index"):
            ss.entries(0)
    finally:
        shutil.copy(tmp_path / "a.tar", provider["dir"] / "a.tar")


def _one_species_shards(root: Path, n: int) -> list[Path]:
    from tests._fixtures_data import TAXA, write_tol_shard

    from bioclip_fast.data.synthetic import jpeg_bytes

    root.mkdir(parents=True)
    return [write_tol_shard(root / f"shard-{i:06d}.tar", [{"key": f"s{i}_{k}", "taxon": TAXA[i], "jpg": jpeg_bytes(k)}
                                                          for k in range(4)]) for i in range(n)]


def test_class_table_is_memory_mapped_subset_and_old_manifests_still_load(tmp_path):
    """index-shards writes the class table as .npy arrays (the JSON keeps no per-class data); a loader memory-maps
    it (no Taxon built at startup), takes the classes of the shards it uses (a subset, renumbered) and labels
    samples through it; a manifest of the previous format (classes in the JSON) still loads with the same classes."""
    import json

    from bioclip_fast.data.index import INDEX_MANIFEST, ClassTable, index_shards, load_class_table
    from tests._fixtures_data import TAXA

    paths = _one_species_shards(tmp_path / "d", 4)
    index_shards(str(tmp_path / "d"), progress=False)
    m = json.loads((tmp_path / "d" / INDEX_MANIFEST).read_text())
    assert "classes" not in m and all("classes" not in e for e in m["shards"])
    assert len(list((tmp_path / "d").glob("bioclip_index.*.npy"))) == len(m["class_table"]["files"])
    full = make_loader(str(tmp_path / "d"), 4, image_size=S, num_workers=0, train=False)
    assert isinstance(full.classes, ClassTable) and isinstance(full.classes._a["text"], np.memmap)
    assert [t.label for t in full.classes] == sorted(t.label for t in TAXA)
    sub = make_loader([str(paths[3]), str(paths[1])], 4, image_size=S, num_workers=0, train=False)
    assert [t.label for t in sub.classes] == sorted([TAXA[1].label, TAXA[3].label])
    import pickle

    blob = pickle.dumps(sub.classes)  # to a spawned worker: by its files, not a copy of the arrays
    assert len(blob) < 2000 and [t.label for t in pickle.loads(blob)] == [t.label for t in sub.classes]
    for b in sub:  # labels index the subset
        assert [sub.classes[lab].label for lab in b["label"].tolist()] == [TAXA[int(k[1])].label for k in b["key"]]
    # re-indexing replaces the table files (no stale ones left)
    index_shards(str(tmp_path / "d"), progress=False, resume=False)
    m2 = json.loads((tmp_path / "d" / INDEX_MANIFEST).read_text())
    assert sorted(p.name for p in (tmp_path / "d").glob("bioclip_index.*.npy")) == sorted(
        m2["class_table"]["files"].values())

    # the previous format: per-class rows and per-shard class ids in the JSON
    table = load_class_table(tmp_path / "d")
    old = {k: v for k, v in m2.items() if k != "class_table"}
    old["classes"] = [table.row(i) for i in range(len(table))]
    for k, e in enumerate(old["shards"]):
        e["classes"] = table.shard_classes(k).tolist()
    for f in (tmp_path / "d").glob("bioclip_index.*.npy"):
        f.unlink()
    (tmp_path / "d" / INDEX_MANIFEST).write_text(json.dumps(old))
    again = make_loader([str(paths[3]), str(paths[1])], 4, image_size=S, num_workers=0, train=False)
    assert again.source.indexed_at_startup == 0
    assert [t.label for t in again.classes] == [t.label for t in sub.classes]
    assert sorted(k for b in again for k in b["key"]) == sorted(f"s{i}_{k}" for i in (1, 3) for k in range(4))


def _rank_split_worker(rank, world, init_file, shard_dir, out_dir):
    import json as _json

    import torch.distributed as dist

    from bioclip_fast.data.shard_set import ShardSet

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ss = ShardSet(shard_dir, rank=rank, world_size=world)
        Path(out_dir, f"{rank}.json").write_text(_json.dumps(
            {"local": ss.indexed_locally, "all": ss.indexed_at_startup, "counts": ss.counts.tolist(),
             "classes": [t.label for t in ss.classes]}))
    finally:
        dist.destroy_process_group()


def test_ranks_split_indexing_without_an_index(tmp_path):
    import json

    import torch.multiprocessing as mp

    d = tmp_path / "tol"
    write_tol_shards(d, 6, 3)
    mp.start_processes(_rank_split_worker, args=(2, str(tmp_path / "init"), str(d), str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")  # fork: no second torch import per rank
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    assert (r0["local"], r1["local"], r0["all"]) == (3, 3, 6)  # each rank indexed half, then they exchanged
    assert r0["counts"] == r1["counts"] == [3] * 6 and r0["classes"] == r1["classes"] and len(r0["classes"]) == 4


def test_read_path_loads_each_small_shard_once(tmp_path):
    """60 shards x 10 samples: the 8-lane order touches more shards than a fixed 24-entry cache held; each shard's
    table must be loaded once per process, not re-parsed on every miss."""
    from bioclip_fast.data.index import index_shards
    from bioclip_fast.data.batch_reader import BatchReader, SourceConfig
    from bioclip_fast.data.shard_set import ShardSet

    write_tol_shards(tmp_path / "s", 60, 10)
    index_shards(str(tmp_path / "s"), progress=False)
    ss = ShardSet(str(tmp_path / "s"))
    cfg = SourceConfig(batch_size=50, image_size=S, train=True, seed=0, rank=0, world_size=1, shuffle=True,
                       shuffle_buffer=500, drop_last=True, crop_scale=(0.9, 1.0), crop_ratio=(0.75, 4 / 3))
    reader = BatchReader(ss, cfg, decode=False)
    keys = []
    for b in range(12):
        raw = reader.read_positions(0, list(range(b * 50, (b + 1) * 50)), (0, 0, b), replace=True)
        keys += raw["key"]
        assert raw["jpeg_sizes"].sum() == raw["jpeg"].numel() and len(raw["captions"]) == 50
    assert len(set(keys)) == 600 and ss.loads == 60


def test_empty_dir_and_csv_as_shards_are_one_line_errors(tmp_path, capsys):
    from bioclip_fast.cli import main as cli_main

    (tmp_path / "empty").mkdir()
    csv = tmp_path / "meta.csv"
    csv.write_text("image,species\na.jpg,x\n")
    with pytest.raises(DataError, match=r"no \.tar shards in this directory"):
        make_loader(str(tmp_path / "empty"), 4)
    with pytest.raises(DataError, match=r"is a CSV file, not a tar shard"):
        make_loader([str(csv)], 4)
    cases = [(["train", "--data", str(tmp_path / "empty"), "--max-steps", "1"], "no .tar shards in this directory"),
             (["train", "--data", str(csv), "--max-steps", "1"], "is a CSV file, not a tar shard"),
             (["train", "--val-data", str(tmp_path / "empty"), "--max-steps", "1"], "--val-data: shard spec"),
             (["eval", "--checkpoint", str(csv), "--data", str(tmp_path / "empty") + "/*.tar"], "no files match"),
             (["eval", "--checkpoint", str(csv), "--data", f"{tmp_path}/x-{{0..3}}.tar"], "4 of 4 expanded")]
    for argv, msg in cases:
        rc = cli_main(argv)
        err = capsys.readouterr().err
        assert rc == 2, argv
        assert err.startswith(f"bioclip-fast {argv[0]}: error: ") and msg in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
