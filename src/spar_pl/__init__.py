"""spar-pl: SPAR (Single-Pass Any-Resolution ViT) for open-vocabulary segmentation, in PyTorch Lightning.

The data path: image -> windows -> teacher features (:mod:`spar_pl.sliding`); image -> student
features (:mod:`spar_pl.encoders`); features -> text similarity -> mask (:mod:`spar_pl.openvocab`).
"""

__version__ = "0.1.0"

__all__ = ["SPAR", "ModelSpec", "load"]


def __getattr__(name: str):
    """``spar_pl.load``, ``spar_pl.SPAR`` and ``spar_pl.ModelSpec``, imported on first use (``import spar_pl`` stays
    light)."""
    if name in __all__:
        from spar_pl import api

        return getattr(api, name)
    raise AttributeError(f"module 'spar_pl' has no attribute {name!r}")
