"""Zero-shot classification: templates and class names, prompt ensembling, metrics, image folders and
labelled shards, against a colour-reading CLIP whose answers are known and against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_support import (
    COLOURS,
    colour_model,
    shared_tokenizer,
    tiny_model,
    write_colour_folder,
    write_labelled_shards,
)

from clip_train.evaluation import (
    DatasetError,
    TemplateError,
    classification_metrics,
    evaluate_zero_shot,
    image_folder,
    labelled_shards,
    load_classnames,
    load_templates,
)
from clip_train.evaluation.templates import builtin_template_sets, check_templates
from clip_train.evaluation.zero_shot import class_prompts, classifier_from_text_embeddings

# ------------------------------------------------------------------------------------------ templates


def test_builtin_template_sets():
    assert builtin_template_sets() == ["imagenet80", "single"]
    assert load_templates("single") == ["a photo of a {}."]
    imagenet = load_templates("imagenet80")
    assert len(imagenet) == len(set(imagenet)) == 80
    assert "a photo of a {}." in imagenet and "itap of my {}." in imagenet
    assert all(t.count("{}") == 1 for t in imagenet)


def test_user_template_file(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# my prompts\n\na drawing of a {}.\n  {} on a table  \n")
    assert load_templates(str(path)) == ["a drawing of a {}.", "{} on a table"]


@pytest.mark.parametrize("bad", ["a photo of a cat.", "a {} and a {}.", "a {0} photo"])
def test_template_without_placeholder(tmp_path, bad):
    path = tmp_path / "bad.txt"
    path.write_text(f"a photo of a {{}}.\n{bad}\n")
    with pytest.raises(TemplateError, match=r"bad\.txt:2: .*exactly one '\{\}'"):
        load_templates(path)
    with pytest.raises(TemplateError, match="entry 1"):
        check_templates([bad])


def test_missing_template_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.txt.*built-in sets: imagenet80, single"):
        load_templates(tmp_path / "nothere.txt")


def test_inline_template(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_templates("a photo of the number {}.") == ["a photo of the number {}."]
    long = "a photo of " + "a very " * 100 + "small {}."  # longer than a file name may be: no OSError
    assert load_templates(long) == [long]
    with pytest.raises(TemplateError, match=r"^inline template: template 'a \{\} and a \{\}\.' must contain"):
        load_templates("a {} and a {}.")
    # An existing file wins over the inline reading of its name.
    (tmp_path / "a {}.txt").write_text("a drawing of a {}.\n")
    assert load_templates("a {}.txt") == ["a drawing of a {}."]
    # Neither a set, a file nor a template: the error names all three forms.
    with pytest.raises(FileNotFoundError, match=r"built-in sets: imagenet80, single; or one template inline"):
        load_templates("a photo of a digit")


def test_class_name_files(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("red\ngreen\n\nblue\n")
    assert load_classnames(path) == ["red", "green", "blue"]
    path.write_text("# nothing but a comment\n\n")
    with pytest.raises(TemplateError, match=r"classes\.txt: the class list is empty"):
        load_classnames(path)
    path.write_text("cat\ndog\ncat\n")
    with pytest.raises(TemplateError, match=r"listed twice.*cat"):
        load_classnames(path)
    with pytest.raises(FileNotFoundError, match=r"gone\.txt"):
        load_classnames(tmp_path / "gone.txt")
    with pytest.raises(TemplateError, match="class list is empty"):
        class_prompts([], ["a {}"])


# ------------------------------------------------------------------------------------ classifier, metrics


def test_prompt_ensemble_normalises_each_then_the_mean():
    torch.manual_seed(0)
    embeds = torch.randn(3 * 4, 8) * torch.rand(12, 1) * 10  # 3 classes × 4 templates, varied norms
    classifier = classifier_from_text_embeddings(embeds, 3)
    for c in range(3):
        unit = [e / e.norm() for e in embeds[4 * c : 4 * c + 4]]
        mean = sum(unit) / 4
        torch.testing.assert_close(classifier[c], mean / mean.norm())


def test_classification_metrics_by_hand():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # right
            [0.1, 0.9, 0.0],  # wrong (0 → 1), top-2 right
            [0.1, 0.9, 0.0],  # right
            [0.1, 0.9, 0.0],  # right
            [0.0, 0.1, 0.9],  # wrong (1 → 2)
            [0.0, 0.1, 0.9],  # right
        ]
    )
    m = classification_metrics(logits, labels)
    assert m.top1 == pytest.approx(4 / 6)
    assert m.top5 == 1.0  # only 3 classes: top-min(5, C)
    assert m.per_class_recall == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert m.mean_per_class_recall == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m.confusion.tolist() == [[1, 1, 0], [0, 2, 1], [0, 0, 1]]


def test_top5_and_empty_classes():
    torch.manual_seed(0)
    logits = torch.randn(50, 10)
    labels = torch.randint(0, 9, (50,))  # class 9 has no images
    m = classification_metrics(logits, labels)
    in_top5 = [labels[i].item() in logits[i].topk(5).indices.tolist() for i in range(50)]
    assert m.top5 == pytest.approx(np.mean(in_top5))
    assert math.isnan(m.per_class_recall[9])
    assert m.to_dict()["per_class_recall"]["9"] is None
    assert m.mean_per_class_recall == pytest.approx(np.nanmean(m.per_class_recall))


# --------------------------------------------------------------------------------------- end to end


def test_colour_model_is_always_right_on_an_image_folder(tmp_path):
    root = write_colour_folder(tmp_path / "colours", per_class=3)
    dataset = image_folder(root)
    assert dataset.classnames == ["blue", "green", "red"]  # sorted folder names
    for templates in ("single", "imagenet80"):
        result = evaluate_zero_shot(colour_model(), dataset, load_templates(templates))
        assert result.metrics.top1 == 1.0
        assert result.metrics.confusion.tolist() == [[3, 0, 0], [0, 3, 0], [0, 0, 3]]
        assert result.predictions.tolist() == dataset.labels.tolist()


@pytest.mark.parametrize("label", ["cls", "json", "json-name"])
def test_colour_model_is_always_right_on_labelled_shards(tmp_path, label):
    pattern = write_labelled_shards(tmp_path / "shards", per_class=3, label=label)
    dataset = labelled_shards(pattern, list(COLOURS))
    assert len(dataset) == 9 and dataset.labels.bincount().tolist() == [3, 3, 3]
    result = evaluate_zero_shot(colour_model(), dataset, load_templates("single"))
    assert result.metrics.top1 == 1.0


def test_random_model_matches_brute_force(tmp_path):
    model = tiny_model(seed=5)
    dataset = image_folder(write_colour_folder(tmp_path / "colours", per_class=2))
    templates = ["a photo of a {}.", "a {} thing", "{}"]
    result = evaluate_zero_shot(model, dataset, templates, batch_size=4)

    tokenizer = shared_tokenizer()
    from clip_train.data.transforms import eval_transform
    from clip_train.evaluation.datasets import load_image

    transform = eval_transform(model.image_size)
    with torch.no_grad():
        weights = []
        for name in dataset.classnames:  # one prompt at a time
            unit = [
                F.normalize(model.encode_text(tokenizer([t.replace("{}", name)])), dim=-1)[0]
                for t in templates
            ]
            mean = torch.stack(unit).mean(0)
            weights.append(mean / mean.norm())
        classifier = torch.stack(weights)
        images = torch.stack([transform(load_image(ref)) for ref in dataset.images])
        feats = F.normalize(model.encode_image(images), dim=-1)
    expected = (feats @ classifier.T).argmax(1)
    assert result.predictions.tolist() == expected.tolist()
    assert result.metrics.top1 == pytest.approx((expected == dataset.labels).float().mean().item())


# --------------------------------------------------------------------------------------------- bad input


def test_undecodable_image_is_named(tmp_path):
    root = write_colour_folder(tmp_path / "colours", per_class=2, bad=["green_1.jpg"])
    with pytest.raises(DatasetError, match=r"image does not decode: .*green[/\\]green_1\.jpg"):
        evaluate_zero_shot(colour_model(), image_folder(root), ["{}"])


def test_undecodable_image_in_a_shard_is_named(tmp_path):
    pattern = write_labelled_shards(tmp_path / "s", per_class=2, shards=1, bad_keys=["000000002"])
    with pytest.raises(DatasetError, match=r"shard-000000\.tar::000000002\.jpg"):
        evaluate_zero_shot(colour_model(), labelled_shards(pattern, list(COLOURS)), ["{}"])


def test_image_folder_problems(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        image_folder(tmp_path / "missing_dir")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        image_folder(tmp_path / "flat")
    root = write_colour_folder(tmp_path / "colours", per_class=1)
    with pytest.raises(DatasetError, match="3 class folders but the class-name list has 2"):
        image_folder(root, ["a", "b"])
    with pytest.raises(TemplateError, match="class list is empty"):
        labelled_shards(str(tmp_path / "x.tar"), [])


def test_shard_label_problems(tmp_path):
    pattern = write_labelled_shards(tmp_path / "s", per_class=1, shards=1)
    with pytest.raises(DatasetError, match=r"label 2 is not a class index in \[0, 2\)"):
        labelled_shards(pattern, ["red", "green"])  # labels 0..2, two names
    named = write_labelled_shards(tmp_path / "n", per_class=1, shards=1, label="json-name")
    with pytest.raises(DatasetError, match="'blue' is not in the class-name list"):
        labelled_shards(named, ["red", "green", "purple"])
    with pytest.raises(FileNotFoundError, match=r"shard-000009\.tar"):
        labelled_shards(str(tmp_path / "s" / "shard-000009.tar"), list(COLOURS))
