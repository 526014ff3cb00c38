"""Shared fixtures: tiny randomly initialised encoders built in-process (no downloads), tiny image folders."""

from __future__ import annotations

import logging

import pytest
import torch

from spar_pl.encoders import DenseEncoder, build_encoder
from spar_pl.testing import TINY_MODELS, write_sample_images, write_tiny_benchmarks

logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that tiny models have no pretrained weights


def tiny_encoder(backbone: str, seed: int = 0) -> DenseEncoder:
    torch.manual_seed(seed)
    return build_encoder(backbone, TINY_MODELS[backbone])


@pytest.fixture(params=["maskclip", "siglip2"])
def encoder(request) -> DenseEncoder:
    return tiny_encoder(request.param)


@pytest.fixture
def clip_encoder() -> DenseEncoder:
    return tiny_encoder("maskclip")


@pytest.fixture
def siglip_encoder() -> DenseEncoder:
    return tiny_encoder("siglip2")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder with ``train/`` (6 generated images) and ``val/`` (2), one per test module."""
    root = tmp_path_factory.mktemp("tiny")
    write_sample_images(root / "train", 6, seed=0)
    write_sample_images(root / "val", 2, seed=1)
    return root


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The six benchmarks in their official layouts, 3 generated images each, one per test module."""
    return write_tiny_benchmarks(tmp_path_factory.mktemp("bench"), images=3)
