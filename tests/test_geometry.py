"""Geometry from the model: patch sizes 8, 14, 16 and 32, pretraining sizes the patch does not divide, training crops
floored to the student's patch, default crops, grids and the fold."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spar_pl.data import DistillDataModule
from spar_pl.distill import DistillModule
from spar_pl.encoders import build_encoder
from spar_pl.sliding import FEATURE_MODES, SlidingWindowTeacher, default_crop, sliding_window
from spar_pl.testing import TINY_GEOMETRIES, naive_teacher

PATCH_MODELS = sorted(TINY_GEOMETRIES)


class PatchStat(nn.Module):
    """A stand-in encoder of any patch: a fixed nonlinear function of each patch's pixels."""

    def __init__(self, patch: int, native: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch_size, self.native_size = patch, native
        self.mix = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(F.avg_pool2d(x, self.patch_size)))


@pytest.mark.parametrize(
    ("patch", "native", "crop"),
    [
        (8, 64, 64),
        (14, 384, 378),
        (14, 224, 224),
        (16, 512, 512),
        (32, 224, 224),
        (14, 336, 336),
        (16, 378, 368),
        (14, 10, 14),
    ],
)
def test_default_crop_is_the_largest_patch_multiple_within_the_pretraining_size(patch, native, crop):
    assert default_crop(PatchStat(patch, native)) == crop
    assert SlidingWindowTeacher(PatchStat(patch, native)).crop == crop


@pytest.mark.parametrize("patch", [8, 14, 16, 32])
@pytest.mark.parametrize(("size", "stride"), [((100, 150), 24), ((130, 97), 16), ((64, 200), 28), ((50, 40), 24)])
def test_fold_is_the_exact_average_for_every_patch(patch, size, stride):
    enc = PatchStat(patch, 64)
    crop = default_crop(enc)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        got = sliding_window(enc, images, crop, stride, patch, window_batch=5)
        expected = naive_teacher(enc, images, crop, stride)
    assert got.shape == (2, 4, size[0] // patch, size[1] // patch)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", PATCH_MODELS)
def test_tiny_twins_of_every_patch_run_single_pass_and_sliding_window(name):
    family, patch, native = TINY_GEOMETRIES[name]
    torch.manual_seed(0)
    encoder = build_encoder(model_name=name, pretrained=None)
    crop = encoder.default_crop
    assert crop % patch == 0 and crop <= native < crop + patch
    height, width = 3 * patch + 5, 5 * patch + 3  # not multiples of the patch
    images = torch.randn(1, 3, height, width)
    with torch.no_grad():
        single = encoder(images)
        teacher = SlidingWindowTeacher(encoder, stride=24)(images)
        reference = naive_teacher(encoder, images, crop, 24)
    ceil = family == "siglip"  # SigLIP pads to the next patch multiple; CLIP drops the remainder
    assert single.shape[-2:] == ((4, 6) if ceil else (3, 5))
    assert teacher.shape[-2:] == (3, 5) and teacher.shape[1] == encoder.embed_dim
    torch.testing.assert_close(teacher, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "crop"), [("spar-tiny-clip-p14", 70), ("spar-tiny-sl2-p14", 56)])
def test_patch14_training_images_align_student_and_teacher(name, crop, images, tmp_path):
    """Every training image the data module yields has sides divisible by the student's patch 14, and student and
    teacher grids match without cropping (the teacher crop: the largest multiple of 14 within the native size)."""
    torch.manual_seed(0)
    module = DistillModule(model_name=name, pretrained=None, window_batch=64)
    assert (module.student.patch_size, module.teacher.crop, module.crop_multiple) == (14, crop, 14)
    data = DistillDataModule(str(images / "train"), box=(150, 100), min_side=40, num_workers=0)
    seen: list[tuple[int, int]] = []

    class Check(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            x = pl_module.student.normalize(batch["image"])
            height, width = x.shape[-2:]
            seen.append((height, width))
            assert height % 14 == 0 and width % 14 == 0, (height, width)
            with torch.no_grad():
                student, teacher = pl_module.student(x), pl_module.teacher_features(x)
            assert student.shape == teacher.shape == (1, student.shape[1], height // 14, width // 14)

    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Check()],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    assert len(seen) == 12 and len(set(seen)) > 1  # 6 images, 2 epochs, several sizes
    assert data.crop_multiple() == 14 and data.training_augmentation().multiple == 14


def test_the_data_module_keeps_16_without_a_model_and_takes_an_explicit_multiple(images):
    data = DistillDataModule(str(images / "train"), box=(150, 100), min_side=40)
    assert data.crop_multiple() == 16 and data.training_augmentation().multiple == 16
    data = DistillDataModule(str(images / "train"), box=(150, 100), min_side=40, multiple=14)
    stream = data.training_stream()
    assert all(s["image"].shape[1] % 14 == 0 and s["image"].shape[2] % 14 == 0 for s in stream)
    with pytest.raises(ValueError, match="multiple must be a positive"):
        DistillDataModule(str(images / "train"), multiple=0)


def test_inference_and_evaluation_take_the_model_s_crop():
    import spar_pl
    from spar_pl.evaluate import SegEvalModule

    model = spar_pl.load(model_name="spar-tiny-sl2-p14", device="cpu")
    image = torch.rand(3, 100, 130)
    feats = model.features(image, mode="sliding")
    assert feats.shape[-2:] == (100 // 14, 130 // 14)
    with pytest.raises(ValueError, match="crop 64 is not a multiple of the patch size 14"):
        model.check_mode("sliding", 24, FEATURE_MODES, 64)
    module = SegEvalModule(model_name="spar-tiny-sl2-p14", mode="sliding", results_dir=None)
    assert module.encoder.default_crop == 56 and module.encoder.backbone == "siglip"
