"""Dense recipes: what the last block of an open_clip ViT CLIP computes for dense features.

The training-free open-vocabulary segmenters built on CLIP run every block but the last as usual and replace
the last block (``docs/method.md`` section "Dense recipes"). With ``q, k, v`` the last block's ``in_proj`` of
``ln_1(x)`` split into heads and ``s = head_dim ** -0.5``:

* ``maskclip`` (SPAR's, the default): ``x + out_proj(v)``, then the feed-forward with its residual.
* ``sclip``: ``x + out_proj((softmax(q q^T s) + softmax(k k^T s)) v)``, then the feed-forward with its residual.
* ``clearclip``: ``out_proj(softmax(q q^T s) v)``: no residual, no feed-forward.
* ``naclip``: ``out_proj(softmax(k k^T s + Omega) v)``: no residual, no feed-forward; ``Omega`` is a Gaussian
  (std :data:`NACLIP_STD` patches) of the patch-grid distance between query and key, zero in the class token's
  row and column (:func:`neighbourhood_prior`).

The block's output then goes through the tower's ``ln_post`` and ``proj`` as usual. Each function takes the block,
the tokens ``(B, 1 + h * w, D)`` (class token first, batch first) and the patch grid ``h x w``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NACLIP_STD",
    "RECIPES",
    "check_recipe",
    "clearclip_block",
    "maskclip_block",
    "naclip_block",
    "neighbourhood_prior",
    "sclip_block",
    "unused_block_parameters",
]

#: NACLIP's Gaussian standard deviation, in patches (its default ``gaussian_std``).
NACLIP_STD = 5.0


def _heads(blk: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v`` of ``ln_1(x)`` split into heads: each ``(B, heads, N, head_dim)``."""
    attn: nn.MultiheadAttention = blk.attn
    b, n, dim = x.shape
    qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    qkv = qkv.view(b, n, 3, attn.num_heads, dim // attn.num_heads).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def _merge(blk: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Heads ``(B, heads, N, head_dim)`` back to ``(B, N, D)`` through the block's ``out_proj``."""
    b, _, n, _ = out.shape
    return blk.attn.out_proj(out.transpose(1, 2).reshape(b, n, -1))


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None = None):
    """``softmax(query key^T / sqrt(head_dim) + bias) value`` (PyTorch's fused attention where it has one)."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias)


def maskclip_block(blk: nn.Module, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """MaskCLIP: attention replaced by the value projection; residual and feed-forward kept."""
    attn: nn.MultiheadAttention = blk.attn
    dim = x.shape[-1]
    value = F.linear(blk.ln_1(x), attn.in_proj_weight[2 * dim :], attn.in_proj_bias[2 * dim :])
    x = x + blk.ls_1(attn.out_proj(value))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def sclip_block(blk: nn.Module, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """SCLIP: correlative self-attention ``(softmax(q q^T s) + softmax(k k^T s)) v``; residual and feed-forward
    kept."""
    q, k, v = _heads(blk, x)
    x = x + blk.ls_1(_merge(blk, _attend(q, q, v) + _attend(k, k, v)))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def clearclip_block(blk: nn.Module, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """ClearCLIP: q-q attention ``softmax(q q^T s) v``; residual and feed-forward dropped."""
    q, _, v = _heads(blk, x)
    return _merge(blk, _attend(q, q, v))


def neighbourhood_prior(
    h: int, w: int, std: float = NACLIP_STD, device: torch.device | str | None = None, dtype=torch.float32
) -> torch.Tensor:
    """NACLIP's ``Omega`` ``(1 + h * w, 1 + h * w)``: ``exp(-d^2 / (2 std^2))`` for the patch-grid distance ``d``
    between the query and key patches (row-major grid), zero in the class token's row and column."""
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1)
    d2 = (pos[:, None, :] - pos[None, :, :]).square().sum(-1)
    return F.pad(torch.exp(-d2 / (2 * std**2)), (1, 0, 1, 0)).to(dtype)


def naclip_block(blk: nn.Module, x: torch.Tensor, h: int, w: int, std: float = NACLIP_STD) -> torch.Tensor:
    """NACLIP: neighbourhood-aware k-k attention ``softmax(k k^T s + Omega) v``; residual and feed-forward
    dropped."""
    _, k, v = _heads(blk, x)
    omega = neighbourhood_prior(h, w, std, k.device, k.dtype)
    return _merge(blk, _attend(k, k, v, omega))


#: Recipe name -> last-block function.
RECIPES: dict[str, Callable[[nn.Module, torch.Tensor, int, int], torch.Tensor]] = {
    "maskclip": maskclip_block,
    "sclip": sclip_block,
    "clearclip": clearclip_block,
    "naclip": naclip_block,
}
#: Recipes whose last block keeps neither the residual around attention nor the feed-forward.
ATTENTION_ONLY = frozenset({"clearclip", "naclip"})


def check_recipe(recipe: str) -> str:
    """``recipe`` if it names one of :data:`RECIPES`, else ``ValueError`` listing them."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown dense recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return recipe


def unused_block_parameters(recipe: str, blk: nn.Module) -> list[nn.Parameter]:
    """Parameters of the last block that ``recipe`` never uses: ``ln_2``, the feed-forward and its LayerScale for
    the attention-only recipes (ClearCLIP, NACLIP), none otherwise."""
    if check_recipe(recipe) not in ATTENTION_ONLY:
        return []
    return [*blk.ln_2.parameters(), *blk.mlp.parameters(), *blk.ls_2.parameters()]
