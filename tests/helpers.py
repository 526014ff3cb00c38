"""Plain helpers shared by test modules (fixtures live in ``conftest.py``), and the callbacks the subprocess
tests load through the CLI (``--trainer.callbacks+=tests.helpers.RecordIds``)."""

import os
import signal
from pathlib import Path

import lightning as L
import torch

from spar_pl.encoders import DinoTxtEncoder, build_encoder

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "distill" / "tiny.yaml")


def fit_args(images: Path, root: Path, *extra: str) -> list[str]:
    """``spar-cli fit`` arguments for the tiny distillation config on the ``images`` fixture's folders."""
    return [
        "fit",
        "--config",
        TINY,
        "--data.init_args.train_source",
        str(images / "train"),
        "--data.init_args.val_source",
        str(images / "val"),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


def visual_names(encoder, prefix: str) -> set[str]:
    """Names (as ``trainable_parameters`` gives them) of the vision tower's parameters under ``prefix``."""
    return {f"model.visual.{n}" for n, _ in encoder.model.visual.named_parameters() if n.startswith(prefix)}


class RecordIds(L.Callback):
    """Append ``epoch id`` lines of every training image to ``<out>/rank<r>.txt``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / f"rank{trainer.global_rank}.txt").open("a") as fh:
            fh.writelines(f"{trainer.current_epoch} {i}\n" for i in batch["id"])


class Interrupt(L.Callback):
    """Stop a run at the start of global step ``step``: with an error, as a crash would, or (``kill``) with SIGKILL,
    as ``kill -9`` would (no hook, no flush: only what was on disk survives)."""

    def __init__(self, step: int, kill: bool = False) -> None:
        self.step, self.kill = step, kill

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"interrupted at step {self.step}")


# -- DINOv3.txt weight files --------------------------------------------------------------------------------------
# The official layouts are written here from the key list in ``shared/reference/DINOV3TXT.md`` (independently of
# :meth:`DinoTxtEncoder.convert_state_dict`), so a wrong mapping fails the tests that load them.

DINOTXT_TINY = "spar-tiny-dinotxt"
RELEASED_NAMES = (
    "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
    "dinov3_vitl16_dinotxt_vision_head_and_text_encoder-a442d8f5.pth",
)


def tiny_dinotxt(seed: int = 0) -> DinoTxtEncoder:
    """The DINOv3.txt tiny twin with random weights from ``seed``."""
    torch.manual_seed(seed)
    return build_encoder("dinov3txt", DINOTXT_TINY)


def randomise(encoder: DinoTxtEncoder, seed: int = 1) -> DinoTxtEncoder:
    """Non-trivial weights everywhere (q/v biases and LayerScale included); the text qkv bias stays zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in encoder.model.named_parameters():
            if name.endswith("in_proj_bias"):
                p.zero_()  # the official text tower has no qkv bias
            elif ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        periods = encoder.model.visual.rope.periods
        # the file stores periods rounded to bfloat16; perturbed so that recomputing them would differ
        periods.copy_((periods * 1.01).to(torch.bfloat16).float())
    return encoder


def official_files(encoder: DinoTxtEncoder) -> tuple[dict, dict]:
    """The (backbone file, dino.txt file) state dicts in the official key layouts, from a tiny model's weights."""
    m = encoder.model
    v, t = m.visual, m.text
    d = m.embed_dim
    g = torch.Generator().manual_seed(7)
    backbone = {
        "cls_token": v.cls_token,
        "storage_tokens": v.reg_token,
        "mask_token": torch.zeros(1, d),
        "patch_embed.proj.weight": v.patch_embed.proj.weight,
        "patch_embed.proj.bias": v.patch_embed.proj.bias,
        "rope_embed.periods": v.rope.periods.to(torch.bfloat16),
        "norm.weight": v.norm.weight,
        "norm.bias": v.norm.bias,
    }
    for i, blk in enumerate(v.blocks):
        a = blk.attn
        k_bias = torch.randn(d, generator=g)  # masked in the official model: must have no effect
        ones = torch.ones(d)
        backbone |= {
            f"blocks.{i}.norm1.weight": blk.norm1.weight,
            f"blocks.{i}.norm1.bias": blk.norm1.bias,
            f"blocks.{i}.attn.qkv.weight": a.qkv.weight,
            f"blocks.{i}.attn.qkv.bias": torch.cat([a.q_bias, k_bias, a.v_bias]),
            f"blocks.{i}.attn.qkv.bias_mask": torch.cat([ones, torch.zeros(d), ones]),
            f"blocks.{i}.attn.proj.weight": a.proj.weight,
            f"blocks.{i}.attn.proj.bias": a.proj.bias,
            f"blocks.{i}.ls1.gamma": blk.gamma_1,
            f"blocks.{i}.norm2.weight": blk.norm2.weight,
            f"blocks.{i}.norm2.bias": blk.norm2.bias,
            f"blocks.{i}.mlp.fc1.weight": blk.mlp.fc1.weight,
            f"blocks.{i}.mlp.fc1.bias": blk.mlp.fc1.bias,
            f"blocks.{i}.mlp.fc2.weight": blk.mlp.fc2.weight,
            f"blocks.{i}.mlp.fc2.bias": blk.mlp.fc2.bias,
            f"blocks.{i}.ls2.gamma": blk.gamma_2,
        }
    hidden = 2752 * d // 1024
    head = {"visual_model.head.ln_final.weight": torch.ones(d), "visual_model.head.ln_final.bias": torch.zeros(d)}
    for i in range(2):
        p = f"visual_model.head.blocks.{i}."
        head |= {
            p + "norm1.weight": torch.ones(d),
            p + "norm1.bias": torch.zeros(d),
            p + "attn.qkv.weight": torch.randn(3 * d, d, generator=g),
            p + "attn.proj.weight": torch.randn(d, d, generator=g),
            p + "attn.proj.bias": torch.zeros(d),
            p + "ls1.gamma": torch.ones(d),
            p + "norm2.weight": torch.ones(d),
            p + "norm2.bias": torch.zeros(d),
            p + "mlp.w1.weight": torch.randn(hidden, d, generator=g),
            p + "mlp.w1.bias": torch.zeros(hidden),
            p + "mlp.w2.weight": torch.randn(hidden, d, generator=g),
            p + "mlp.w2.bias": torch.zeros(hidden),
            p + "mlp.w3.weight": torch.randn(d, hidden, generator=g),
            p + "mlp.w3.bias": torch.zeros(d),
            p + "ls2.gamma": torch.ones(d),
        }
    text = {
        "logit_scale": m.logit_scale,
        "text_model.backbone.token_embedding.weight": t.token_embedding.weight,
        "text_model.backbone.positional_embedding": t.positional_embedding,
        "text_model.backbone.ln_final.weight": t.ln_final.weight,
        "text_model.backbone.ln_final.bias": t.ln_final.bias,
        "text_model.head.linear_projection.weight": t.text_projection.T,
    }
    for i, blk in enumerate(t.transformer.resblocks):
        p = f"text_model.backbone.blocks.{i}."
        text |= {
            p + "attention_norm.weight": blk.ln_1.weight,
            p + "attention_norm.bias": blk.ln_1.bias,
            p + "attention.qkv.weight": blk.attn.in_proj_weight,
            p + "attention.proj.weight": blk.attn.out_proj.weight,
            p + "attention.proj.bias": blk.attn.out_proj.bias,
            p + "ffn_norm.weight": blk.ln_2.weight,
            p + "ffn_norm.bias": blk.ln_2.bias,
            p + "feed_forward.fc1.weight": blk.mlp.c_fc.weight,
            p + "feed_forward.fc1.bias": blk.mlp.c_fc.bias,
            p + "feed_forward.fc2.weight": blk.mlp.c_proj.weight,
            p + "feed_forward.fc2.bias": blk.mlp.c_proj.bias,
        }
    clone = lambda state: {k: x.detach().clone().contiguous() for k, x in state.items()}  # noqa: E731
    return clone(backbone), clone(head | text)


def write_official_files(encoder: DinoTxtEncoder, root: Path) -> tuple[Path, Path]:
    """Save ``encoder``'s weights as the two official files (backbone, dino.txt) under their released names."""
    backbone, dinotxt = official_files(encoder)
    torch.save(backbone, root / RELEASED_NAMES[0])
    torch.save(dinotxt, root / RELEASED_NAMES[1])
    return root / RELEASED_NAMES[0], root / RELEASED_NAMES[1]
