import numpy as np
import pytest
from PIL import Image

from spar_pl.cli import main, quickstart


def test_quickstart_writes_overlays(tmp_path, capsys):
    numbers = quickstart(["--out", str(tmp_path), "--classes", "sky", "grass, lawn", "house"])
    assert numbers["heldout_mse_after"] < numbers["heldout_mse_before"]
    assert list((tmp_path / "distill").rglob("last.ckpt"))
    assert "| SPAR |" in numbers["table"] and (tmp_path / "tiny.md").is_file()
    for name in ("overlay_single.png", "overlay_sliding.png", "labels_single.png", "labels_sliding.png"):
        img = Image.open(tmp_path / name)
        assert img.size == (480, 320)
    labels = np.asarray(Image.open(tmp_path / "labels_sliding.png"))
    assert labels.max() < 3
    assert numbers["sliding_window_s"] > 0 and -1 <= numbers["feature_cosine"] <= 1
    assert "windows" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*tmp"))


def test_quickstart_on_a_user_image_and_bad_image(tmp_path):
    Image.new("RGB", (100, 70), (10, 200, 30)).save(tmp_path / "me.jpg")
    quickstart(
        ["--backbone", "maskclip", "--image", str(tmp_path / "me.jpg"), "--out", str(tmp_path / "o"), "--no-distill"]
    )
    assert Image.open(tmp_path / "o" / "overlay_single.png").size == (100, 70)
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="bad.jpg"):
        quickstart(["--image", str(tmp_path / "bad.jpg"), "--out", str(tmp_path / "o"), "--no-distill"])


def test_main_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["nope"])
    assert exc.value.code == 2 and "quickstart" in capsys.readouterr().out
