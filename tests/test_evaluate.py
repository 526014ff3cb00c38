"""Open-vocabulary evaluation (spar_pl.evaluate, ``SegEvalModule``): mIoU by hand and through the module, sliding
evaluation, DDP counts, the shipped protocols, results files."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from spar_pl.evaluate import SegEvalModule
from spar_pl.segdata import SegDataModule, SegDataset

ROOT = Path(__file__).resolve().parents[1]


def tiny_eval(**kwargs):
    torch.manual_seed(0)
    args = {"backbone": "siglip2", "model_name": "spar-tiny-sl2", "pretrained": None, "crop": 64, "results_dir": None}
    return SegEvalModule(**{**args, **kwargs})


def run_test(module, datamodule):
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    return trainer.test(module, datamodule, verbose=False)[0]


def test_perfect_prediction_gives_miou_one_and_ignores_255(bench):
    module = tiny_eval(classes="voc21")

    def oracle(image, size):
        label = oracle.labels.pop(0)
        return torch.where(label == 255, torch.tensor(7), label)  # wrong only where ignored

    data = SegDataset("voc21", bench["voc21"])
    oracle.labels = [data[i]["label"] for i in range(len(data))]
    module.predict_mask = oracle
    metrics = run_test(module, SegDataModule("voc21", str(bench["voc21"])))
    assert metrics["test/mIoU"] == pytest.approx(100.0)


def test_hand_computed_dataset_level_miou_through_the_module():
    """test_step and on_test_epoch_end on two hand-made images: one confusion matrix over the dataset (not a mean
    of per-image scores), 255 ignored whatever is predicted there, a class absent from both prediction and label
    left out of the mean."""
    module = tiny_eval(classes=["a", "b", "c", "d"])
    labels = [torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]]), torch.tensor([[0, 0], [0, 0]])]
    preds = [torch.tensor([[0, 1, 1, 1], [2, 0, 3, 2]]), torch.tensor([[0, 0], [0, 1]])]
    module.predict_mask = lambda image, size: preds.pop(0)
    batches = [{"image": [torch.zeros(3, *lab.shape) for lab in labels], "label": labels}]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    metrics = trainer.test(module, DataLoader(batches, batch_size=None), verbose=False)[0]
    # a: tp 1+3, label 2+4, pred 2+3 -> 4/7; b: tp 2, label 3, pred 3+1 -> 2/5; c: tp 1, label 2, pred 2 -> 1/3;
    # d: predicted only on the ignored pixel, absent from the labels -> not in the mean
    expected = {"a": 4 / 7, "b": 2 / 5, "c": 1 / 3}
    for name, iou in expected.items():
        assert metrics[f"test/IoU/{name}"] == pytest.approx(100 * iou)
    assert metrics["test/mIoU"] == pytest.approx(100 * sum(expected.values()) / 3)
    assert not preds  # every image went through test_step


def test_batch_size_does_not_change_the_numbers(bench, tmp_path):
    one = run_test(tiny_eval(classes="ade20k"), SegDataModule("ade20k", str(bench["ade20k"]), batch_size=1))
    two = run_test(tiny_eval(classes="ade20k"), SegDataModule("ade20k", str(bench["ade20k"]), batch_size=2))
    assert one["test/mIoU"] == pytest.approx(two["test/mIoU"], abs=1e-9)


def test_sliding_mode_and_checkpoint_rows(bench, tmp_path):
    from safetensors.torch import save_file

    base = tiny_eval(classes="voc20")
    path = tmp_path / "student.ckpt"
    state = base.encoder.model.state_dict()
    torch.save({"state_dict": {f"segmentor.net.model.{k}": v for k, v in state.items()}}, path)
    assert tiny_eval(checkpoint=str(path)).row == "SPAR"
    assert tiny_eval(mode="sliding").row == "pretrained, sliding window s=24"
    assert tiny_eval(mode="sliding-features").row == "pretrained, feature-level sliding window s=24"
    save_file({k: v.contiguous() for k, v in base.encoder.model.state_dict().items()}, str(tmp_path / "s.safetensors"))
    assert tiny_eval(weights=str(tmp_path / "s.safetensors")).row == "SPAR"
    module = tiny_eval(classes="voc20", mode="sliding", results_dir=str(tmp_path), results_name="t")
    run_test(module, SegDataModule("voc20", str(bench["voc20"])))
    entry = json.loads((tmp_path / "t.json").read_text())[-1]
    assert entry["dataset"] == "voc20" and entry["images"] == 3 and entry["row"].startswith("pretrained, sliding")
    assert set(entry["per_class_IoU"]) == {n[0] for n in base.classes}


@pytest.mark.slow
def test_ddp_counts_every_image_exactly_once(bench, tmp_path):
    """3 images on 2 CPU processes: the same per-class IoU and pixel count as one process."""

    def run(devices: int, name: str) -> dict:
        cmd = [sys.executable, "-m", "spar_pl.cli", "test", "--config", str(ROOT / "configs/eval/context59.yaml")]
        cmd += ["--config", str(ROOT / "configs/backbones/tiny.yaml"), "--data.init_args.root", str(bench["context59"])]
        cmd += ["--model.init_args.results_dir", str(tmp_path), "--model.init_args.results_name", name]
        cmd += ["--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--data.init_args.num_workers", "0"]
        if devices > 1:
            cmd += ["--trainer.strategy", "ddp"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((tmp_path / f"{name}.json").read_text())[-1]

    single, ddp = run(1, "one"), run(2, "two")
    assert ddp["devices"] == 2 and ddp["images"] == single["images"] == 3
    assert ddp["pixels"] == single["pixels"]
    assert ddp["per_class_IoU"] == pytest.approx(single["per_class_IoU"], abs=1e-9)
    assert ddp["mIoU"] == pytest.approx(single["mIoU"], abs=1e-9)


def test_predict_returns_masks_at_label_size(bench):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    out = trainer.predict(tiny_eval(classes="cityscapes"), SegDataModule("cityscapes", str(bench["cityscapes"])))
    items = [item for batch in out for item in batch]
    assert len(items) == 3 and all(item["mask"].shape == (64, 128) for item in items)


@pytest.mark.parametrize(
    ("backbone", "dataset", "expected"),
    [
        ("maskclip", "voc21-maskclip", (65.0, 0.1, 0.1)),
        ("maskclip-legacy", "voc21-maskclip", (65.0, 0.1, 0.1)),
        ("maskclip", "voc20", (40.0, 0.0, None)),
        ("maskclip", "voc21", (65.0, 0.0, None)),  # the plain VOC21 config: no backbone changes it
        ("siglip2", "voc21", (65.0, 0.0, None)),
    ],
)
def test_shipped_configs_give_the_published_protocol(backbone, dataset, expected):
    """``spar-cli test --config configs/eval/voc21-maskclip.yaml --config configs/backbones/maskclip.yaml`` (tiny
    weights): MaskCLIP's VOC21 protocol (prob_thd 0.1, area_thd 0.1, docs/method.md section 4) comes from the eval
    config."""
    from spar_pl.cli import lightning_cli

    tiny = "spar-tiny-clip" if backbone.startswith("maskclip") else "spar-tiny-sl2"
    argv = ["--config", str(ROOT / "configs" / "eval" / f"{dataset}.yaml")]
    argv += ["--config", str(ROOT / "configs" / "backbones" / f"{backbone}.yaml")]
    argv += ["--model.init_args.model_name", tiny, "--model.init_args.pretrained", "null"]
    cli = lightning_cli(argv, run=False)
    head = cli.model.build_head()
    assert (head.logit_scale, head.prob_thd, head.area_thd) == expected
    assert cli.model.encoder.backbone == backbone


def test_logits_level_sliding_evaluation_follows_the_authors(bench):
    """Sliding mode: per-window logits resized to the window, averaged on a full-resolution canvas (the authors'
    evaluation); it differs from classifying the teacher's folded features."""
    logits = tiny_eval(classes="voc20", mode="sliding")
    features = tiny_eval(classes="voc20", mode="sliding-features")
    image = torch.rand(3, 80, 112)
    with torch.no_grad():
        x = logits.encoder.normalize(image[None])
        text = logits.build_head().text
        canvas, count = torch.zeros(len(text), 80, 112), torch.zeros(1, 80, 112)
        from spar_pl.sliding import window_starts

        for top in window_starts(80, 64, 24):
            for left in window_starts(112, 64, 24):
                feats = torch.nn.functional.normalize(logits.encoder(x[..., top : top + 64, left : left + 64]), dim=1)
                win = torch.einsum("bchw,sc->bshw", feats, text)
                win = torch.nn.functional.interpolate(win, size=(64, 64), mode="bilinear", align_corners=False)
                canvas[:, top : top + 64, left : left + 64] += win[0]
                count[:, top : top + 64, left : left + 64] += 1
        final = torch.nn.functional.interpolate((canvas / count)[None], size=(60, 84), mode="bilinear")
        expected = logits.head.mask(logits.head.class_scores((final * logits.head.logit_scale).softmax(1)))[0]
        got = logits.predict_mask(image, (60, 84))
        assert torch.equal(got, expected)
        assert not torch.equal(got, features.predict_mask(image, (60, 84)))


def test_results_file_is_written_by_a_callback_and_a_damaged_one_fails_first(bench, tmp_path):
    """The results entry goes through ``ResultsFile`` (attached by the task); a results file that is not a JSON
    list stops the run before any image is evaluated, naming the file, and is left as it was."""
    module = tiny_eval(classes="voc20", results_dir=str(tmp_path), results_name="t")
    assert [type(c).__name__ for c in module.configure_callbacks()] == ["ResultsFile"]
    assert tiny_eval(results_dir=None).configure_callbacks() == []
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"results file .*t\.json is not valid JSON"):
        run_test(module, SegDataModule("voc20", str(bench["voc20"])))
    assert module.images.update_count == 0 and (tmp_path / "t.json").read_text() == "{not json"
    (tmp_path / "t.json").unlink()
    run_test(module, SegDataModule("voc20", str(bench["voc20"])))
    entries = json.loads((tmp_path / "t.json").read_text())
    assert len(entries) == 1 and entries[0] == module.results and entries[0]["images"] == 3


@pytest.mark.parametrize("classes", ["voc21", "context60"])
def test_the_evaluation_head_embeds_the_benchmark_names(classes):
    """The head ``SegEvalModule`` builds holds, synonym for synonym, the embeddings of the class file's names
    (the names themselves: embedding their printed Python lists, "['sky'", would move every mIoU)."""
    from spar_pl.openvocab import parse_classes, text_embeddings

    module = tiny_eval(classes=classes)
    names = [name for synonyms in parse_classes(classes) for name in synonyms]
    head = module.build_head()
    assert head.synonyms == names and head.classes == parse_classes(classes)
    torch.testing.assert_close(head.text, text_embeddings(module.encoder, names), rtol=0, atol=0)


def test_an_option_the_module_does_not_take_is_one_line_naming_it(capsys):
    from spar_pl.cli import main

    argv = ["test", "--config", str(ROOT / "configs" / "eval" / "voc21.yaml"), "--config"]
    argv += [str(ROOT / "configs" / "backbones" / "tiny.yaml"), "--model.init_args.protocol_overrides"]
    argv += ['{"voc21": {"prob_thd": 0.1}}']
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("spar-cli")]  # Lightning's INFO lines aside
    assert exc.value.code == 1 and len(lines) == 1 and "'protocol_overrides.voc21.prob_thd' is not accepted" in lines[0]
    assert "Traceback" not in err and "Union subtypes" not in err


def test_ad_hoc_runs_keep_their_own_file_and_cells_say_where_they_came_from(bench, tmp_path, capsys):
    """An ad-hoc ``spar-cli test`` writes <name>-test.json with its checkpoint digest, data root, configs and time; the
    table's file and its rendered cells stay as the table left them; ``--render-only --tiny`` renders tiny.md."""
    from safetensors.torch import save_file

    from spar_pl.cli import main

    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_eval().encoder.model.state_dict().items()}, str(weights))
    table_entry = {"dataset": "voc20", "row": "SPAR", "mIoU": 5.7, "seconds_per_image": 0.1}
    (tmp_path / "tiny.json").write_text(json.dumps([table_entry]))
    args = [
        "test",
        "--config",
        str(ROOT / "configs/eval/voc20.yaml"),
        "--config",
        str(ROOT / "configs/backbones/tiny.yaml"),
    ]
    args += ["--data.init_args.root", str(bench["voc20"]), "--data.init_args.num_workers", "0"]
    args += ["--model.init_args.results_dir", str(tmp_path), "--model.init_args.weights", str(weights)]
    main([*args, "--trainer.enable_progress_bar", "false"])
    entry = json.loads((tmp_path / "tiny-test.json").read_text())[-1]
    assert entry["row"] == "SPAR" and entry["source"] == "spar-cli test"
    assert entry["files"]["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert entry["data_root"] == str(Path(bench["voc20"]).absolute())
    assert [Path(c).name for c in entry["config_files"]] == ["voc20.yaml", "tiny.yaml"]
    assert entry["time"]
    assert json.loads((tmp_path / "tiny.json").read_text()) == [table_entry]  # the table's file is untouched
    capsys.readouterr()
    main(["table", "--render-only", "--tiny", "--results", str(tmp_path)])
    table = (tmp_path / "tiny.md").read_text()
    assert "| SPAR | - | 5.7 |" in table and "1. SPAR, VOC20: no provenance recorded" in table
    (tmp_path / "tiny.json").write_text(json.dumps([entry]))
    main(["table", "--render-only", "--tiny", "--results", str(tmp_path)])
    note = next(line for line in (tmp_path / "tiny.md").read_text().splitlines() if line.startswith("1. SPAR, VOC20"))
    assert f"weights w.safetensors (sha256 {entry['files']['weights']['sha256'][:12]})" in note
    assert f"data {entry['data_root']}" in note and "config voc20.yaml + tiny.yaml" in note
