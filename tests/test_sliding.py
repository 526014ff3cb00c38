import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spar_pl.sliding import SlidingWindowTeacher, upsample_factor, window_starts
from spar_pl.testing import naive_teacher


class PatchStatEncoder(nn.Module):
    """A stand-in encoder whose features are a fixed nonlinear function of each patch's pixels."""

    patch_size = 16
    native_size = 64

    def __init__(self, channels: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mix = nn.Conv2d(3, channels, 1)
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return torch.tanh(self.mix(F.avg_pool2d(x, self.patch_size)))


def test_window_starts_include_the_edge_window():
    assert window_starts(100, 64, 24) == [0, 24, 36]
    assert window_starts(112, 64, 24) == [0, 24, 48]
    assert window_starts(64, 64, 24) == [0]
    assert window_starts(40, 64, 24) == [0]
    assert window_starts(1024, 512, 24)[-2:] == [504, 512]
    with pytest.raises(ValueError):
        window_starts(100, 64, 0)


# Worked by hand from docs/method.md section 2, step 1: range(0, L - c + 1, s), then L - c if the last start is not it;
# a side no longer than the crop: [0]. (L, c, s): starts.
HAND_STARTS = {
    (100, 64, 24): [0, 24, 36],  # range(0, 37, 24) = 0, 24; 24 != 36: add 36
    (112, 64, 24): [0, 24, 48],  # range(0, 49, 24) ends on 48 = L - c
    (64, 64, 24): [0],
    (50, 64, 24): [0],
    (65, 64, 24): [0, 1],  # L - c = 1
    (200, 96, 40): [0, 40, 80, 104],  # patch 8: L - c = 104
    (336, 112, 56): [0, 56, 112, 168, 224],  # patch 14: ends on L - c = 224
    (518, 224, 24): [*range(0, 289, 24), 294],  # patch 14 (DINOv2's 518): 0 ... 288, then 294
    (512, 224, 24): list(range(0, 289, 24)),  # 288 = 12 x 24 = L - c
    (300, 128, 48): [0, 48, 96, 144, 172],  # patch 16/32: L - c = 172
    (1000, 448, 32): [*range(0, 545, 32), 552],  # patch 32: 0 ... 544, then 552
    (100, 32, 7): [0, 7, 14, 21, 28, 35, 42, 49, 56, 63, 68],
}

# Step 2 by hand: the smallest divisor u of p with s % (p // u) == 0, trying u = 1, 2, ... (p, s): u.
HAND_FACTORS = {
    (8, 24): 1,  # 24 % 8 == 0
    (8, 12): 2,  # 12 % 8 = 4; u = 2: 12 % 4 == 0
    (8, 6): 4,  # 6 % 8, 6 % 4 fail; u = 4: 6 % 2 == 0
    (8, 5): 8,
    (14, 28): 1,
    (14, 21): 2,  # 21 % 14 = 7; u = 2: 21 % 7 == 0
    (14, 24): 7,  # 24 % 14 = 10, 24 % 7 = 3; u = 7: 24 % 2 == 0
    (14, 9): 14,  # no divisor of 14 but 1 divides 9
    (16, 8): 2,
    (16, 16): 1,
    (16, 24): 2,  # the reference: stride 24, patch 16, cell 8
    (16, 12): 4,  # 12 % 16, 12 % 8 fail; u = 4: 12 % 4 == 0
    (16, 56): 2,
    (16, 112): 1,
    (16, 32): 1,
    (16, 224): 1,
    (16, 7): 16,
    (32, 64): 1,
    (32, 48): 2,  # 48 % 32 = 16; u = 2: 48 % 16 == 0
    (32, 24): 4,  # 24 % 32, 24 % 16 fail; u = 4: 24 % 8 == 0
    (32, 20): 8,  # 20 % 8 = 4; u = 8: 20 % 4 == 0
    (32, 3): 32,
}


@pytest.mark.parametrize(("args", "starts"), HAND_STARTS.items(), ids=str)
def test_window_starts_by_hand(args, starts):
    assert window_starts(*args) == starts


@pytest.mark.parametrize(("args", "factor"), HAND_FACTORS.items(), ids=str)
def test_upsample_factor_by_hand(args, factor):
    assert upsample_factor(*args) == factor


def test_window_starts_by_brute_force():
    """Every offset checked against the definition: a start is a multiple of the stride that leaves a whole window,
    or the far edge's window; together the windows cover the side."""
    for size in range(1, 300):
        for crop, stride in ((64, 24), (64, 64), (32, 7), (224, 24), (28, 14)):
            last = max(size - crop, 0)
            expected = [t for t in range(last + 1) if t % stride == 0 or t == last]
            assert window_starts(size, crop, stride) == expected, (size, crop, stride)


@pytest.mark.parametrize(
    ("size", "stride"), [((100, 150), 24), ((96, 160), 32), ((128, 80), 56), ((70, 64), 8), ((40, 150), 24)]
)
def test_fold_is_exact_average(size, stride):
    enc = PatchStatEncoder()
    images = torch.randn(2, 3, *size)
    teacher = SlidingWindowTeacher(enc, crop=64, stride=stride, window_batch=7)
    with torch.no_grad():
        got = teacher(images)
        expected = naive_teacher(enc, images, 64, stride)
    assert got.shape == (2, 5, size[0] // 16, size[1] // 16)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_constant_features_average_to_the_constant():
    class Constant(PatchStatEncoder):
        def forward(self, x):
            return torch.full((x.shape[0], 3, x.shape[2] // 16, x.shape[3] // 16), 2.5)

    out = SlidingWindowTeacher(Constant(), crop=64, stride=24)(torch.randn(1, 3, 100, 150))
    torch.testing.assert_close(out, torch.full_like(out, 2.5))


def test_non_overlapping_windows_tile_the_single_window_features(encoder):
    teacher = SlidingWindowTeacher(encoder, crop=64, stride=64)
    images = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        got = teacher(images)
        tiles = [[encoder(images[..., r : r + 64, c : c + 64]) for c in (0, 64, 128)] for r in (0, 64)]
    expected = torch.cat([torch.cat(row, dim=3) for row in tiles], dim=2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_window_batch_changes_nothing_but_chunking(encoder):
    images = torch.randn(2, 3, 100, 130)
    small = SlidingWindowTeacher(encoder, crop=64, stride=24, window_batch=1)
    large = SlidingWindowTeacher(encoder, crop=64, stride=24, window_batch=64)
    calls = []
    handle = encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        a = small(images)
        n_small = len(calls)
        b = large(images)
    handle.remove()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    windows = 2 * small.num_windows(100, 130)
    assert n_small == windows and max(calls) <= 64 and sum(calls[n_small:]) == windows


def test_image_smaller_than_crop(encoder):
    teacher = SlidingWindowTeacher(encoder, crop=64, stride=24)
    with torch.no_grad():
        wide = teacher(torch.randn(1, 3, 40, 200))  # short side below the crop: one row of windows
        tiny = torch.randn(1, 3, 48, 32)
        small = teacher(tiny)  # both sides below: one window, the single pass
        single = encoder(tiny)
    assert wide.shape == (1, encoder.embed_dim, 2, 12)
    assert teacher.num_windows(40, 200) == len(window_starts(200, 64, 24))
    up = F.interpolate(single, size=(48 // 8, 32 // 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(small, F.interpolate(up, size=(3, 2), mode="bilinear", align_corners=False))


def test_batch_items_are_independent(encoder):
    images = torch.randn(3, 3, 80, 112)
    teacher = SlidingWindowTeacher(encoder, crop=64, stride=24, window_batch=5)
    with torch.no_grad():
        batched = teacher(images)
        alone = torch.cat([teacher(images[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_crop_defaults_to_native_size_and_validates(encoder):
    assert SlidingWindowTeacher(encoder).crop == 64
    with pytest.raises(ValueError, match="multiple of the patch"):
        SlidingWindowTeacher(encoder, crop=70)
    with pytest.raises(ValueError, match="window_batch"):
        SlidingWindowTeacher(encoder, window_batch=0)
