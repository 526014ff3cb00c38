"""``spar-cli demo``: driven as a user would, through gradio_client against a running server on localhost, and
(slow) in a real headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the demo needs the demo extra: pip install 'spar-pl[demo]'")
gradio_client = pytest.importorskip("gradio_client")

from spar_pl.cli import main  # noqa: E402
from spar_pl.demo import SINGLE, SLIDING, STUDENT, build_app, launch_options, load_models, segment_request  # noqa: E402
from spar_pl.encoders import ModelSpec  # noqa: E402
from spar_pl.images import to_pil  # noqa: E402
from spar_pl.scenes import SHAPE_CLASSES, make_scenes  # noqa: E402

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
CLASSES = "\n".join(SHAPE_CLASSES)


def options(**overrides) -> dict:
    """``load_models``'s arguments: ``spar-cli demo``'s defaults (the shipped tiny model), on the CPU, with small
    upload limits."""
    values = dict(
        model=ModelSpec(),
        student=None,
        device="cpu",
        precision="32-true",
        stride=24,
        crop=None,
        max_side=512,
        max_pixels=200_000,
        max_file_mb=1,
    )
    return {**values, **overrides}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def models():
    return load_models(**options())


@pytest.fixture(scope="module")
def server(models):
    """The demo app on a free localhost port, for the whole module."""
    app = build_app(models)
    port = free_port()
    app.queue(max_size=16).launch(**launch_options(models, "127.0.0.1", port), prevent_thread_lock=True, quiet=True)
    yield app, f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture
def scene_file(tmp_path) -> Path:
    path = tmp_path / "scene.png"
    to_pil(make_scenes(1, 320, 7, "demo-test")[0][0]).resize((320, 224)).save(path)
    return path


def test_segment_request_overlays_labels_and_bounds(models, tmp_path):
    image = np.asarray(to_pil(make_scenes(1, 256, 1, "demo-test")[0][0]))
    gallery, summary, files = segment_request(models, image, CLASSES, [SLIDING, SINGLE], 128, tmp_path)
    assert [caption.split(":")[0] for _, caption in gallery] == [SINGLE, SLIDING]  # display order
    assert all(overlay.size == (256, 256) for overlay, _ in gallery)  # at the image's size, downscaled inside
    labels = [np.asarray(Image.open(f)) for f in files]
    assert all(a.shape == (256, 256) and a.max() < len(SHAPE_CLASSES) for a in labels)
    assert "model input at most 128 px" in summary and "| single pass |" in summary
    for args, message in [
        ((None, CLASSES, [SINGLE], 256), "no image"),
        ((np.zeros((500, 500, 3), np.uint8), CLASSES, [SINGLE], 256), "this demo takes at most 200,000"),
        ((image, "circle", [SINGLE], 256), "at least two classes"),
        ((image, "circle\ncircle", [SINGLE], 256), "circle"),
        ((image, CLASSES, [], 256), "choose at least one"),
        ((image, CLASSES, [STUDENT], 256), "unknown mode 'SPAR student'"),
        ((image, CLASSES, [SINGLE], 4096), "max side must be between 16 and 512"),
        ((np.zeros((4, 4, 3), np.uint8), CLASSES, [SINGLE], 256), "smaller than one"),
    ]:
        with pytest.raises(ValueError, match=message):
            segment_request(models, *args, tmp_path)


def test_demo_serves_gradio_client_requests(server, scene_file):
    """A real client of the running server: upload, classes, overlays at the image's size, the label PNGs, and the
    message for wrong input; one request at a time (the event's concurrency limit)."""
    app, url = server
    client = gradio_client.Client(url, verbose=False)
    start = time.perf_counter()
    gallery, summary, files = client.predict(
        gradio_client.handle_file(str(scene_file)), CLASSES, [SINGLE, SLIDING], 512, api_name="/segment"
    )
    elapsed = time.perf_counter() - start
    assert len(gallery) == 2 and gallery[0]["caption"].startswith("single pass: ")
    assert all(Image.open(item["image"]).size == (320, 224) for item in gallery)
    assert [Image.open(f).size for f in files] == [(320, 224), (320, 224)]
    assert "| sliding window |" in summary and elapsed < 60
    with pytest.raises(gradio_client.exceptions.AppError, match="at least two classes"):
        client.predict(gradio_client.handle_file(str(scene_file)), "circle", [SINGLE], 512, api_name="/segment")
    big = scene_file.with_name("big.png")
    Image.new("RGB", (600, 400)).save(big)
    with pytest.raises(gradio_client.exceptions.AppError, match="600x400 = 240,000 pixels"):
        client.predict(gradio_client.handle_file(str(big)), CLASSES, [SINGLE], 512, api_name="/segment")
    assert [fn.concurrency_limit for fn in app.fns.values() if fn.name == "run"] == [1]


def test_demo_server_refuses_uploads_over_the_file_size_limit(server, tmp_path):
    """The server itself (not only the client) refuses an upload over ``--max-file-mb`` (1 MB here)."""
    import httpx

    _, url = server
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 600, 3), dtype=np.uint8)).save(noise)
    assert noise.stat().st_size > 2**20
    with noise.open("rb") as fh:
        reply = httpx.post(f"{url}gradio_api/upload", files={"files": ("noise.png", fh, "image/png")})
    assert reply.status_code == 413 and "maximum allowed size" in reply.text


def test_demo_command_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--student", str(tmp_path / "absent.ckpt"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and "absent.ckpt" in err and len(err.splitlines()) == 1


def test_demo_student_choice_from_a_checkpoint(tmp_path):
    """``--student`` takes a SPAR checkpoint: the student choice appears and runs."""
    from safetensors.torch import load_file, save_file

    from spar_pl.reproduce import shipped_weights

    state = {f"student.model.{k}": v for k, v in load_file(str(shipped_weights())).items()}
    save_file(state, str(tmp_path / "student.safetensors"))
    models = load_models(**options(student=str(tmp_path / "student.safetensors")))
    assert models.modes() == [SINGLE, SLIDING, STUDENT]
    image = np.asarray(to_pil(make_scenes(1, 128, 2, "demo-test")[0][0]))
    gallery, _, files = segment_request(models, image, CLASSES, [SINGLE, STUDENT], 512, tmp_path)
    same = [np.asarray(Image.open(f)) for f in files]
    assert np.array_equal(same[0], same[1])  # the "student" here holds the shipped weights: the same masks


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="needs Debian's chromium and chromium-driver")
def test_demo_in_headless_chromium(server, scene_file, tmp_path):
    """A real browser: upload an image, type the classes, press Segment, wait for the overlays; a screenshot is
    saved under the test's folder (``demo.png``)."""
    selenium = pytest.importorskip("selenium", reason="the browser test needs selenium")  # noqa: F841
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    _, url = server
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,1000",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
        upload.send_keys(str(scene_file))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "img"))  # the upload is shown
        box = driver.find_element(By.CSS_SELECTOR, "textarea")
        box.clear()
        box.send_keys(CLASSES)
        driver.find_element(By.XPATH, "//button[normalize-space()='Segment']").click()
        wait.until(lambda d: "seconds per image" in d.page_source and "sliding window:" in d.page_source)
        time.sleep(1)  # the images finish painting
        shot = tmp_path / "demo.png"
        driver.save_screenshot(str(shot))
        assert "single pass:" in driver.page_source and "sliding window:" in driver.page_source
    finally:
        driver.quit()
    assert Image.open(shot).size[0] >= 1000
    print(f"screenshot: {shot}")
