"""The Eva-trunk families through the library, on their tiny twins: the family follows from the model
(``build_encoder``, ``spar_pl.load``) and weight files are recognised (fit -> export -> test -> segment -> features:
``tests/test_family_e2e.py``)."""

from __future__ import annotations

import logging

import pytest
import torch

from spar_pl.encoders import build_encoder
from spar_pl.families import eva, family_of_keys, get_family
from spar_pl.testing import TINY_MODELS

TWINS = {"spar-tiny-eva02": ("eva02", eva.EVA02Encoder, 14, 32), "spar-tiny-pe": ("pe", eva.PEEncoder, 16, 48)}


@pytest.mark.parametrize("name", sorted(TWINS))
def test_the_family_follows_from_the_model_and_its_weight_files(name, caplog):
    family, cls, patch, dim = TWINS[name]
    with caplog.at_level(logging.WARNING):
        encoder = build_encoder(model_name=name, pretrained=None)
    assert type(encoder) is cls and (encoder.family, encoder.backbone) == (family, family)
    assert (encoder.patch_size, encoder.native_size, encoder.default_crop) == (patch, 64, 64 // patch * patch)
    assert sum("random weights" in r.getMessage() for r in caplog.records) == 1
    assert TINY_MODELS[family] == name and get_family(family).tiny_model == name
    found, description = family_of_keys(encoder.model.state_dict())
    assert found is get_family(family), description
    assert type(build_encoder(family, pretrained=None, model_name=name)) is cls  # the family named as a backbone
    out = encoder(torch.randn(1, 3, 50, 70))
    assert out.shape == (1, dim, 50 // patch, 70 // patch)
