"""Streaming images for distillation (spar_pl.data): the augmentation recipe, sources, ranks and workers, bad images."""

import warnings

import numpy as np
import pytest
import torch

from spar_pl.data import (
    PRESETS,
    AugmentConfig,
    StreamingImages,
    augment,
    augment_params,
    image_rng,
)
from spar_pl.testing import write_sample_images


def test_augmentation_follows_the_recipe():
    cfg = PRESETS["paper"]
    for k in range(200):
        rng = image_rng(0, f"img{k}")
        h, w = [(1500, 2250), (300, 400), (2000, 1000), (800, 800)][k % 4]
        p = augment_params(h, w, rng, cfg)
        x0, y0, x1, y1 = p["box"]
        rh, rw = p["size"]
        assert (y1 - y0) % 16 == 0 and (x1 - x0) % 16 == 0
        assert 0 <= x0 < x1 <= rw and 0 <= y0 < y1 <= rh
        assert min(y1 - y0, x1 - x0) >= 512 - 15  # at least 512 before flooring to 16
        assert max(rh, rw) <= 2048 + 1 or min(rh, rw) == 512  # inside the box unless upscaled to 512
    image = np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)
    small = AugmentConfig(box=(256, 128), min_side=64)
    p = augment_params(300, 500, image_rng(1, "a"), small)
    out = augment(image, p)
    assert out.shape == (p["box"][3] - p["box"][1], p["box"][2] - p["box"][0], 3)


def test_fixed_mode_repeats_and_fresh_mode_changes(images):
    small = AugmentConfig(box=(256, 128), min_side=64)
    fixed = StreamingImages(str(images / "train"), 6, augmentation=small, mode="fixed", shuffle_buffer=0)
    fresh = StreamingImages(str(images / "train"), 6, augmentation=small, mode="fresh", shuffle_buffer=0)
    shapes = {}
    for name, ds in (("fixed", fixed), ("fresh", fresh)):
        runs = []
        for epoch in (0, 1):
            ds.set_epoch(epoch)
            runs.append({s["id"]: s["image"] for s in ds})
        shapes[name] = runs
    a, b = shapes["fixed"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c, d = shapes["fresh"]
    assert any(c[k].shape != d[k].shape or not torch.equal(c[k], d[k]) for k in c)


def test_ranks_see_disjoint_images_in_equal_numbers(images):
    ranks = [StreamingImages(str(images / "train"), 3, rank=r, world_size=2, shuffle_buffer=4) for r in (0, 1)]
    ids = [[s["id"] for s in ds] for ds in ranks]
    assert len(ids[0]) == len(ids[1]) == 3
    assert not set(ids[0]) & set(ids[1]) and len(set(ids[0]) | set(ids[1])) == 6


def test_order_changes_every_epoch_and_every_image_is_seen_under_ddp(tmp_path):
    """7 images on 2 ranks (3 each per epoch): the split dataset follows the epoch, so the order changes and the
    image a rank leaves out is a different one each epoch."""
    write_sample_images(tmp_path, 7, seed=3, size=(32, 48))
    ranks = [StreamingImages(str(tmp_path), 3, rank=r, world_size=2, shuffle_buffer=4) for r in (0, 1)]
    orders, seen = [], set()
    for epoch in range(4):
        ids = []
        for ds in ranks:
            ds.set_epoch(epoch)
            ids.append([s["id"] for s in ds])
        assert len(ids[0]) == len(ids[1]) == 3 and not set(ids[0]) & set(ids[1])
        orders.append(ids[0] + ids[1])
        seen.update(orders[-1])
    assert len({tuple(o) for o in orders}) == 4  # a new order every epoch
    assert len(seen) == 7  # no image left out of training for good


def test_corrupt_image_is_skipped_named_and_counted(images, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((images / "train").iterdir())[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    ds = StreamingImages(str(folder), 3, shuffle_buffer=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [s["id"] for s in ds]
    assert len(got) == 3 and "broken.jpg" not in got
    assert any("broken.jpg" in str(w.message) for w in caught)
    assert ds.skipped.value == 1


def test_augmentation_caps_extreme_aspect_ratios():
    cfg = PRESETS["paper"]
    with pytest.raises(ValueError, match="extreme aspect ratio 4000x16"):
        augment_params(16, 4000, image_rng(0, "strip"), cfg)
    for k in range(20):  # 300x2000 upscales to 512x3413: the crop keeps at most the box's long side
        p = augment_params(300, 2000, image_rng(k, "wide"), cfg)
        x0, y0, x1, y1 = p["box"]
        assert y1 - y0 == 512 and x1 - x0 <= 2048


def test_bad_images_are_skipped_and_the_count_matches_the_names(images, tmp_path, monkeypatch):
    """A decompression bomb, an extreme strip and (unaugmented, as validation) an image under one patch: each is
    skipped, named once and counted once, and the stream still delivers its quota."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((images / "train").iterdir())[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    Image.new("RGB", (600, 500)).save(folder / "bomb.png")  # 300K pixels, over twice the limit set below
    Image.new("RGB", (4000, 16)).save(folder / "strip.png")
    Image.new("RGB", (12, 40)).save(folder / "tiny.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    small = AugmentConfig(box=(256, 128), min_side=64)
    for augmentation, bad in ((small, {"bomb.png", "strip.png"}), (None, {"bomb.png", "tiny.png"})):
        ds = StreamingImages(str(folder), 6, augmentation=augmentation, shuffle_buffer=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = [s["id"] for s in ds]
        named = [
            name for w in caught for name in ("bomb.png", "strip.png", "tiny.png") if f"{name} in" in str(w.message)
        ]
        assert len(got) == 6 and not set(got) & bad  # the quota is filled from the readable images
        assert sorted(named) == sorted(bad) and ds.skipped.value == len(bad)


def test_missing_source_names_it(tmp_path):
    from spar_pl.data import DistillDataModule

    with pytest.raises(ValueError, match="no/such/folder"):
        DistillDataModule(str(tmp_path / "no/such/folder")).setup("fit")


def test_parquet_and_webdataset_sources(images, tmp_path):
    import io
    import tarfile

    from datasets import Dataset
    from datasets import Image as ImageFeature

    files = sorted((images / "train").glob("*.jpg"))
    table = Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in files]})
    table.cast_column("image", ImageFeature()).to_parquet(str(tmp_path / "shard-0.parquet"))
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for p in files:
            info = tarfile.TarInfo(f"{p.stem}.jpg")
            info.size = p.stat().st_size
            tar.addfile(info, io.BytesIO(p.read_bytes()))
    for source in (tmp_path / "shard-0.parquet", tmp_path / "shard-0.tar"):
        got = list(StreamingImages(str(source), 6, shuffle_buffer=0))
        assert len({s["id"] for s in got}) == 6, source
        assert all(s["image"].shape[1] % 16 == 0 and s["image"].shape[2] % 16 == 0 for s in got)


def test_loader_workers_split_the_stream(images):
    ds = StreamingImages(str(images / "train"), 6, shuffle_buffer=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    ids = [s["id"] for s in loader]
    assert sorted(ids) == sorted(p.name for p in (images / "train").glob("*.jpg"))


def test_nested_folders_keep_images_apart(images, tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "1.jpg").write_bytes(sorted((images / "train").glob("*.jpg"))[0].read_bytes())
    ids = sorted(s["id"] for s in StreamingImages(str(tmp_path), 2, shuffle_buffer=0))
    assert ids == ["a/1.jpg", "b/1.jpg"]


def _batches(loader, count=None):
    out = []
    for batch in loader:
        out.append((batch["id"][0], batch["image"]))
        if len(out) == count:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_training_loader_resumes_mid_epoch_without_replay_or_skip(tmp_path, monkeypatch, workers):
    """7 images (two workers: 4 and 3 each) stopped after 1..6 batches: a new loader restored from the state delivers
    exactly the uninterrupted epoch's remaining images, in order, with the same augmentation; without workers the
    passed-over images are not augmented."""
    import spar_pl.data as data
    from spar_pl.data import TrainingLoader, collate

    write_sample_images(tmp_path, 7, seed=3, size=(48, 64))
    small = AugmentConfig(box=(64, 48), min_side=32, keep_full_p=0.0)

    def loader(epoch):
        ds = StreamingImages(str(tmp_path), 7, augmentation=small, mode="fresh", shuffle_buffer=4)
        ds.set_epoch(epoch)
        return TrainingLoader(ds, batch_size=1, num_workers=workers, collate_fn=collate)

    straight = _batches(loader(1))
    assert len(straight) == 7
    augmented = []
    monkeypatch.setattr(data, "augment", lambda image, params: augmented.append(1) or augment(image, params))
    for stop in range(1, 7):
        first = loader(1)
        head = _batches(first, stop)
        state = first.state_dict()
        resumed = loader(1)
        resumed.load_state_dict(state)
        augmented.clear()
        tail = _batches(resumed)
        got = head + tail
        assert [i for i, _ in got] == [i for i, _ in straight], stop
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, straight)), stop
        if workers == 0:
            assert len(augmented) == 7 - stop  # the passed-over images are decoded only


def test_training_loader_after_a_complete_epoch_and_with_other_workers(images):
    """A state taken at an epoch's end restores nothing into the next epoch (it starts from its first image, with any
    num_workers); resuming mid-epoch with another num_workers is one clear error."""
    from spar_pl.data import TrainingLoader, collate

    def loader(epoch, workers):
        ds = StreamingImages(str(images / "train"), 6, shuffle_buffer=4)
        ds.set_epoch(epoch)
        return TrainingLoader(ds, batch_size=1, num_workers=workers, collate_fn=collate)

    first = loader(0, 0)
    _batches(first)
    state = first.state_dict()
    straight = [i for i, _ in _batches(loader(1, 0))]
    for workers in (0, 2):
        nxt = loader(1, workers)
        nxt.load_state_dict(state)
        assert sorted(i for i, _ in _batches(nxt)) == sorted(straight)
    nxt = loader(1, 0)
    nxt.load_state_dict(state)
    assert [i for i, _ in _batches(nxt)] == straight
    mid = loader(0, 0)
    _batches(mid, 2)
    other = loader(0, 2)
    with pytest.raises(ValueError, match=r"num_workers=0; resuming mid-epoch needs the same \(got 2\)"):
        other.load_state_dict(mid.state_dict())
    with pytest.raises(ValueError, match="not a spar_pl.data.TrainingLoader's"):
        other.load_state_dict({"epoch": 0, "consumed": [2], "num_workers": 0})
