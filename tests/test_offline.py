"""Hub look-ups without a network (spar_pl.offline): one line saying how to work offline, at once."""

import pytest

from spar_pl.cli import main


def test_offline_hub_lookup_fails_at_once_in_one_line(tmp_path, monkeypatch, capsys):
    """HF_HUB_OFFLINE and an empty cache: one line saying how to work offline, no retries, no double prefix."""
    from huggingface_hub import constants

    from spar_pl import offline
    from spar_pl.scenes import scene_image

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    offline.hub_unreachable.cache_clear()
    scene_image(256, 256).save(tmp_path / "scene.png")
    with pytest.raises(SystemExit) as exc:
        main(["segment", str(tmp_path / "scene.png"), "--classes", "a", "b", "--out", str(tmp_path / "o")])
    offline.hub_unreachable.cache_clear()
    err = capsys.readouterr().err
    assert exc.value.code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("spar-cli segment: error: timm/ViT-B-16-SigLIP2-512 is needed from the Hugging Face Hub")
    assert "HF_HUB_OFFLINE is set" in err and "--weights FILE" in err and "spar-cli: " not in err
