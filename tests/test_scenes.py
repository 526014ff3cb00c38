"""The synthetic scenes (spar_pl.scenes): a function of their seed, their shapes, colours and statistics."""

import pytest
import torch

from spar_pl.scenes import SHAPE_CLASSES, SHAPES, SceneConfig, make_scenes, shape_masks


def test_scenes_are_a_function_of_their_seed():
    a_img, a_lab = make_scenes(3, 64, seed=5, stream="s")
    b_img, b_lab = make_scenes(3, 64, seed=5, stream="s")
    c_img, _ = make_scenes(3, 64, seed=6, stream="s")
    d_img, _ = make_scenes(3, 64, seed=5, stream="t")
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    assert not torch.equal(a_img, c_img) and not torch.equal(a_img, d_img)
    # a stream continued from an offset gives the same scenes as one drawn whole
    tail, _ = make_scenes(2, 64, seed=5, stream="s", start=1)
    assert torch.equal(tail, a_img[1:])


def test_scene_shapes_ranges_and_classes():
    images, labels = make_scenes(16, 96, seed=0, stream="test")
    assert images.shape == (16, 3, 96, 96) and images.dtype == torch.float32
    assert labels.shape == (16, 96, 96) and labels.dtype == torch.int64
    assert images.min() >= 0 and images.max() <= 1
    counts = torch.bincount(labels.flatten(), minlength=len(SHAPE_CLASSES))
    assert len(counts) == len(SHAPE_CLASSES) and (counts > 0).all()  # every class appears
    assert counts[0] > counts[1:].max()  # background dominates


def test_scene_pixels_follow_their_labels():
    """Without noise, background pixels have the background colour and shape pixels a visibly different one."""
    config = SceneConfig(noise=0.0)
    images, labels = make_scenes(4, 128, seed=1, stream="test", config=config)
    for image, label in zip(images, labels):
        background = image[:, label == 0][:, :1]
        distance = (image - background[:, :, None]).abs().amax(dim=0)
        assert distance[label == 0].max() < 1e-6
        assert (label > 0).any() and distance[label > 0].min() >= config.min_contrast - 1e-6


def test_scenes_draw_only_the_configured_shapes():
    config = SceneConfig(noise=0.0, shapes=("cross", "circle"))
    assert config.classes == ("background", "cross", "circle")
    _, labels = make_scenes(8, 128, seed=2, stream="test", config=config)
    assert set(labels.unique().tolist()) == {0, 1, 2}
    # a label-1 pixel is drawn by the cross: the default scenes' label 1 (circle) covers a different area
    _, default = make_scenes(8, 128, seed=2, stream="test")
    assert SHAPE_CLASSES == SceneConfig().classes and not torch.equal(labels, default)
    with pytest.raises(ValueError, match="unknown"):
        SceneConfig(shapes=("hexagon",))


def test_scene_statistics_do_not_depend_on_the_size():
    """Objects keep the pretraining scale: class frequencies at 64 px and 256 px agree."""
    _, small = make_scenes(256, 64, seed=0, stream="stats")
    _, large = make_scenes(16, 256, seed=0, stream="stats")
    f_small = torch.bincount(small.flatten(), minlength=len(SHAPE_CLASSES)).float() / small.numel()
    f_large = torch.bincount(large.flatten(), minlength=len(SHAPE_CLASSES)).float() / large.numel()
    assert (f_small - f_large).abs().max() < 0.03


def test_shape_masks_tell_the_shapes_apart():
    # (u, v) in radii, v downwards: centre, near a square's corner, right, below, diagonal, upper right, top
    points = torch.tensor([[0.0, 0.0], [0.75, 0.75], [0.9, 0.0], [0.0, 0.5], [0.6, 0.6], [0.5, -0.5], [0.0, -0.9]])
    u, v = points[:, 0].view(1, -1, 1), points[:, 1].view(1, -1, 1)
    inside = {
        name: shape_masks(torch.tensor(k).view(1, 1, 1), u, v).flatten().tolist() for k, name in enumerate(SHAPES)
    }
    T, F = True, False
    assert inside["circle"] == [T, F, T, T, T, T, T]
    assert inside["square"] == [T, T, F, T, T, T, F]
    assert inside["ring"] == [F, F, T, T, T, T, T]
    assert inside["triangle"] == [T, T, F, T, T, F, T]
    assert inside["cross"] == [T, F, T, T, F, F, T]
