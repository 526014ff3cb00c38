import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from spar_pl import cache as cache_module
from spar_pl.cache import TeacherCache
from spar_pl.cli import cache, main
from spar_pl.testing import write_sample_images

from .helpers import ROOT, TINY, fit_args

MANIFEST = {
    "backbone": "siglip2",
    "model_name": "m",
    "weights": "w",
    "crop": 64,
    "stride": 24,
    "seed": 0,
    "augmentation": "a",
    "precision": "32-true",
    "reader": "r",
}


def test_round_trip_float16_and_checks(tmp_path):
    store = TeacherCache(tmp_path, MANIFEST)
    feats = torch.randn(8, 3, 5)
    path = store.save("dir/img 1.jpg", "c1", feats)
    assert path.parent == tmp_path and not list(tmp_path.glob(".*tmp"))
    got = store.load("dir/img 1.jpg", "c1", (3, 5))
    torch.testing.assert_close(got, feats.half().float())
    assert store.is_valid("dir/img 1.jpg", "c1", (3, 5))
    assert store.load("missing", "c1") is None and not store.is_valid("missing", "c1")
    assert store.load("dir/img 1.jpg", "c1", (4, 5)) is None  # shape differs from the image's grid
    assert store.load("dir/img 1.jpg", "c2") is None and not store.is_valid("dir/img 1.jpg", "c2")  # new content
    other = TeacherCache(tmp_path, {**MANIFEST, "stride": 32})
    assert other.load("dir/img 1.jpg", "c1") is None and other.rejected == 1  # written under another config
    decoded_otherwise = TeacherCache(tmp_path, {**MANIFEST, "reader": "r2"})  # other image decoding rules
    assert not decoded_otherwise.is_valid("dir/img 1.jpg", "c1", (3, 5))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the tensor bytes: the header check passes, the read checks the checksum
    path.write_bytes(bytes(data))
    assert store.is_valid("dir/img 1.jpg", "c1") and store.load("dir/img 1.jpg", "c1") is None
    path.write_bytes(path.read_bytes()[:-40])  # truncated
    assert not store.is_valid("dir/img 1.jpg", "c1") and store.load("dir/img 1.jpg", "c1") is None


def test_ids_never_share_a_file_and_long_ids_work(tmp_path):
    store = TeacherCache(tmp_path, MANIFEST)
    ids = ["a/b.jpg", "a_b.jpg", "é.jpg", "ü.jpg", "d/" * 200 + "long.jpg"]
    for k, image_id in enumerate(ids):
        store.save(image_id, "c", torch.full((2, 1, 1), float(k)))
    assert len({store.path(i) for i in ids}) == len(ids)
    for k, image_id in enumerate(ids):
        assert store.load(image_id, "c")[0, 0, 0] == k


def test_stale_temporary_files_are_cleaned(tmp_path):
    store = TeacherCache(tmp_path, MANIFEST)
    stale = tmp_path / ".0123.safetensors.abc123.tmp"
    stale.write_bytes(b"half written")
    keep = store.save("x.jpg", "c", torch.zeros(2, 1, 1))
    assert store.clean_temporary() == 1 and not stale.exists() and keep.exists()


def test_only_the_owner_cleans_and_writes_the_manifest(tmp_path):
    """Under DDP every rank opens the cache; a second rank must not remove the owner's half-written files (a race
    that once failed the two-process cache test) nor write the manifest itself."""
    root = tmp_path / "cache"
    TeacherCache(root, MANIFEST, owner=False)
    assert not root.exists()
    TeacherCache(root, MANIFEST)
    (manifest := root / "manifest.json").unlink()
    writing = root / ".manifest.json.abc123.tmp"
    writing.write_text("{")
    follower = TeacherCache(root, MANIFEST, owner=False)
    assert writing.exists() and not manifest.exists()
    follower.save("x.jpg", "c", torch.zeros(2, 1, 1))
    TeacherCache(root, MANIFEST)  # the owner, as a killed run's successor: cleans, rewrites the manifest
    assert not writing.exists() and manifest.is_file() and follower.load("x.jpg", "c") is not None


def cache_args(images, store, *extra):
    args = ["--config", TINY, "--data.init_args.train_source", str(images / "train")]
    return [*args, "--model.init_args.teacher_cache", str(store), "--trainer.enable_progress_bar", "false", *extra]


def test_cache_command_resumes_and_training_uses_it(images, tmp_path, monkeypatch):
    store = tmp_path / "cache"
    args = cache_args(images, store)
    first = cache(args)
    assert first["written"] == 6 and first["kept"] == 0
    assert first["bytes_per_image"] < 0.65 * first["float32_bytes_per_image"]
    entries = sorted(store.glob("*.safetensors"))
    entries[0].write_bytes(b"corrupt")
    (store / ".stale.safetensors.x.tmp").write_bytes(b"killed writer")
    digests = []
    real_digest = cache_module._digest
    monkeypatch.setattr(cache_module, "_digest", lambda t: digests.append(1) or real_digest(t))
    second = cache(args)
    assert second["written"] == 1 and second["kept"] == 5 and second["recomputed"] == 1
    assert len(digests) == 1  # only the rewritten entry: valid entries were kept without reading their tensors
    assert not list(store.glob(".*.tmp"))
    monkeypatch.setattr(cache_module, "_digest", real_digest)
    # training reads the cache: same loss as the in-step teacher, up to float16 rounding
    main(
        fit_args(
            images, tmp_path / "cached", "--trainer.max_epochs", "1", "--model.init_args.teacher_cache", str(store)
        )
    )
    main(fit_args(images, tmp_path / "online", "--trainer.max_epochs", "1"))

    def loss(root):
        rows = next(root.rglob("metrics.csv")).read_text().splitlines()
        col = rows[0].split(",").index("train/loss_epoch")
        return next(float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col])

    assert loss(tmp_path / "cached") == pytest.approx(loss(tmp_path / "online"), rel=1e-2)


def test_cache_notices_new_content_and_another_random_teacher(images, tmp_path):
    train = tmp_path / "train"
    write_sample_images(train, 3, seed=0)
    store = tmp_path / "cache"
    args = cache_args(images, store)
    args[args.index(str(images / "train"))] = str(train)
    assert cache(args)["written"] == 3
    replacement = tmp_path / "other"
    write_sample_images(replacement, 1, seed=9)  # same name, other pixels
    (train / "sample_0000.jpg").write_bytes((replacement / "sample_0000.jpg").read_bytes())
    again = cache(args)
    assert again["written"] == 1 and again["kept"] == 2
    reseeded = cache([*args, "--seed_everything", "1"])  # a random-init teacher under another seed
    assert reseeded["written"] == 3 and reseeded["kept"] == 0


def test_cache_refuses_fresh_augmentation(images, tmp_path):
    args = ["--config", TINY, "--data.init_args.train_source", str(images / "train"), "--data.init_args.mode", "fresh"]
    with pytest.raises(ValueError, match="fixed augmentation"):
        cache([*args, "--model.init_args.teacher_cache", str(tmp_path)])


@pytest.mark.slow
def test_cache_on_two_processes_equals_one(tmp_path):
    """``spar-cli cache`` under DDP (2 CPU processes, gloo): each rank a disjoint share, one summary, and the union
    of entries equals a single-process cache; no image computed twice (7 images: the ranks' shares differ)."""
    write_sample_images(tmp_path / "train", 7, seed=2)
    base = ["--config", TINY, "--data.init_args.train_source", str(tmp_path / "train")]
    base += ["--trainer.enable_progress_bar", "false"]
    single = cache([*base, "--model.init_args.teacher_cache", str(tmp_path / "one")])
    assert single["written"] == 7
    cmd = [
        sys.executable,
        "-m",
        "spar_pl.cli",
        "cache",
        *base,
        "--model.init_args.teacher_cache",
        str(tmp_path / "two"),
    ]
    cmd += ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [line for line in result.stdout.splitlines() if line.startswith("cache ")]
    assert len(summaries) == 1, result.stdout
    assert "7 written, 0 already valid" in summaries[0] and "over 2 ranks (written per rank: 4, 3)" in summaries[0]
    one = {p.name: p for p in (tmp_path / "one").glob("*.safetensors")}
    two = {p.name: p for p in (tmp_path / "two").glob("*.safetensors")}
    assert one.keys() == two.keys() and len(one) == 7
    for name in one:
        torch.testing.assert_close(load_file(two[name])["features"], load_file(one[name])["features"])
