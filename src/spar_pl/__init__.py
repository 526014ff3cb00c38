"""spar-pl: SPAR (Single-Pass Any-Resolution ViT) for open-vocabulary segmentation, in PyTorch Lightning.

The data path: image -> windows -> teacher features (:mod:`spar_pl.sliding`); image -> student
features (:mod:`spar_pl.encoders`); features -> text similarity -> mask (:mod:`spar_pl.openvocab`).
"""

__version__ = "0.1.0"
