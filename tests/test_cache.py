import pytest
import torch

from spar_pl.cache import TeacherCache
from spar_pl.cli import cache, main

from .test_distill import TINY, fit_args, images  # noqa: F401  (module fixture)

MANIFEST = {
    "backbone": "siglip2",
    "model_name": "m",
    "weights": "w",
    "crop": 64,
    "stride": 24,
    "seed": 0,
    "augmentation": "a",
    "precision": "32-true",
}


def test_round_trip_float16_and_checks(tmp_path):
    store = TeacherCache(tmp_path, MANIFEST)
    feats = torch.randn(8, 3, 5)
    path = store.save("dir/img 1.jpg", feats)
    assert path.parent == tmp_path and not list(tmp_path.glob(".*tmp"))
    got = store.load("dir/img 1.jpg", (3, 5))
    torch.testing.assert_close(got, feats.half().float())
    assert store.load("missing") is None
    assert store.load("dir/img 1.jpg", (4, 5)) is None  # shape differs from the image's grid
    other = TeacherCache(tmp_path, {**MANIFEST, "stride": 32})
    assert other.load("dir/img 1.jpg") is None and other.rejected == 1  # written under another config
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the tensor bytes
    path.write_bytes(bytes(data))
    assert store.load("dir/img 1.jpg") is None
    path.write_bytes(path.read_bytes()[:40])  # truncated
    assert store.load("dir/img 1.jpg") is None


def test_cache_command_resumes_and_training_uses_it(images, tmp_path):  # noqa: F811
    store = tmp_path / "cache"
    args = ["--config", TINY, "--data.init_args.train_source", str(images / "train")]
    args += ["--model.init_args.teacher_cache", str(store)]
    first = cache(args)
    assert first["written"] == 6 and first["kept"] == 0
    assert first["bytes_per_image"] < 0.6 * first["float32_bytes_per_image"]
    entries = sorted(store.glob("*.safetensors"))
    entries[0].write_bytes(b"corrupt")
    second = cache(args)
    assert second["written"] == 1 and second["kept"] == 5 and second["recomputed"] == 1
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


def test_cache_refuses_fresh_augmentation(images, tmp_path):  # noqa: F811
    args = ["--config", TINY, "--data.init_args.train_source", str(images / "train"), "--data.init_args.mode", "fresh"]
    with pytest.raises(ValueError, match="fixed augmentation"):
        cache([*args, "--model.init_args.teacher_cache", str(tmp_path)])
