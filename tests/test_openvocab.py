import pytest
import torch
import torch.nn.functional as F

from spar_pl.openvocab import BENCHMARK_CLASSES, OpenVocabHead, benchmark_class_file, parse_classes


def test_parse_classes_from_list_file_and_benchmark(tmp_path):
    assert parse_classes(["sky, wall", "cat"]) == [["sky", "wall"], ["cat"]]
    path = tmp_path / "classes.txt"
    path.write_text("road\nperson, rider\n\n")
    assert parse_classes(path) == [["road"], ["person", "rider"]]
    assert parse_classes("voc20")[0] == ["aeroplane"]


@pytest.mark.parametrize(("name", "count"), zip(BENCHMARK_CLASSES, (21, 20, 60, 59, 19, 150)))
def test_shipped_benchmark_class_files(name, count):
    classes = parse_classes(benchmark_class_file(name))
    assert len(classes) == count
    if name == "voc21":
        assert len(classes[0]) == 26 and classes[0][0] == "sky"


def test_parse_classes_errors(tmp_path):
    with pytest.raises(ValueError, match="no classes"):
        parse_classes([])
    with pytest.raises(ValueError, match="'cat'.*classes 0 and 2"):
        parse_classes(["cat", "dog", "kitty, cat"])
    with pytest.raises(ValueError, match="empty name"):
        parse_classes(["cat", "dog, "])
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        parse_classes(tmp_path / "nope.txt")


def make_head(encoder, classes, **kwargs):
    """A head whose synonym embeddings are the unit axes, so similarities are readable off the features."""
    synonyms = sum(len(names) for names in parse_classes(classes))
    return OpenVocabHead(torch.eye(synonyms, encoder.embed_dim), classes, **kwargs)


def test_synonym_max_softmax_and_upsampling(clip_encoder):
    head = make_head(clip_encoder, ["sky, wall, tree", "cat", "dog, puppy"], logit_scale=10.0)
    feats = torch.zeros(1, clip_encoder.embed_dim, 2, 2)
    feats[0, 0] = 1.0  # every location points at synonym 0 ("sky")
    feats[0, 5, 1, 1] = 3.0  # one location mostly "puppy"
    probs = head(feats, (4, 6))
    assert probs.shape == (1, 3, 4, 6)
    logits = F.interpolate(head.synonym_logits(feats), size=(4, 6), mode="bilinear", align_corners=False)
    syn = (logits * 10.0).softmax(dim=1)
    torch.testing.assert_close(probs[:, 0], syn[:, 0:3].amax(dim=1))
    torch.testing.assert_close(probs[:, 1], syn[:, 3])
    torch.testing.assert_close(probs[:, 2], syn[:, 4:6].amax(dim=1))
    mask = head.predict(feats, (4, 6))
    assert mask.dtype == torch.int64 and mask[0, 0, 0] == 0 and mask[0, -1, -1] == 2


def test_probability_threshold_sets_class_zero(clip_encoder):
    feats = torch.zeros(1, clip_encoder.embed_dim, 1, 2)
    feats[0, 1, 0, 0] = 1.0  # confident class 1
    feats[0, 1, 0, 1] = 1.0
    feats[0, 2, 0, 1] = 0.995  # unsure between 1 and 2
    head = make_head(clip_encoder, ["background", "cat", "dog"], logit_scale=40.0, prob_thd=0.6)
    assert head.predict(feats, (1, 2)).tolist() == [[[1, 0]]]
    head.prob_thd = 0.0
    assert head.predict(feats, (1, 2)).tolist() == [[[1, 1]]]


def test_area_threshold_suppresses_small_classes(clip_encoder):
    scores = torch.zeros(1, 3, 10, 10)
    scores[:, 1] = 0.6
    scores[:, 2, 0, 0] = 0.9  # class 2 wins one pixel in 100
    scores[:, 0] = 0.1
    head = make_head(clip_encoder, ["bg", "cat", "dog"], area_thd=0.05)
    mask = head.mask(scores)
    assert (mask == 1).all()
    head.area_thd = None
    assert head.mask(scores)[0, 0, 0] == 2


def test_text_embeddings_follow_the_template_rule_and_are_computed_once(clip_encoder):
    templates = ("a photo of a {}.", "a drawing of a {}.")
    calls = []
    original = clip_encoder.model.encode_text
    clip_encoder.model.encode_text = lambda *a, **k: calls.append(1) or original(*a, **k)
    head = OpenVocabHead.from_encoder(clip_encoder, ["cat, kitty", "dog"], templates=templates)
    n_calls = len(calls)
    assert n_calls and "text" in dict(head.named_buffers()) and not head.state_dict()  # a buffer, not checkpointed
    head.predict(torch.randn(1, clip_encoder.embed_dim, 2, 2), (4, 4))
    assert len(calls) == n_calls  # the head holds the embeddings, not the encoder
    assert not any(isinstance(m, type(clip_encoder)) for m in head.modules())
    clip_encoder.model.encode_text = original
    with torch.no_grad():
        per_template = [clip_encoder.encode_text([t.format(n) for t in templates]) for n in head.synonyms]
    expected = torch.stack([F.normalize(F.normalize(e, dim=-1).mean(0), dim=0) for e in per_template])
    torch.testing.assert_close(head.text, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="for 3 synonyms"):
        OpenVocabHead(expected[:2], ["cat, kitty", "dog"])


def test_head_on_real_encoder_features(encoder):
    head = OpenVocabHead.from_encoder(encoder, "cityscapes")
    with torch.no_grad():
        feats = encoder(torch.randn(2, 3, 64, 96))
        mask = head.predict(feats, (50, 70))
    assert mask.shape == (2, 50, 70) and mask.max() < 19


def test_synonyms_split_on_comma_space_as_the_reference():
    assert parse_classes(["wood ", "person, rider"]) == [["wood "], ["person", "rider"]]


def test_parsed_classes_parse_to_themselves_and_other_entries_are_refused():
    parsed = parse_classes(["sky, wall", "cat", "wood "])
    assert parse_classes(parsed) == parsed == [["sky", "wall"], ["cat"], ["wood "]]
    with pytest.raises(TypeError, match="class 1 is 3"):
        parse_classes(["cat", 3])
    with pytest.raises(ValueError, match="class 0 has no name"):
        parse_classes([[], "cat"])
