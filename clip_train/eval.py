"""`python -m clip_train.eval`: zero-shot classification (and optionally retrieval) of a checkpoint, written
as a JSON report and PNG plots.

    python -m clip_train.eval --checkpoint runs/vit_tiny/checkpoints/last.ckpt \
        --imagefolder data/eval/shapes --templates imagenet80 --out reports/shapes
    python -m clip_train.eval --checkpoint model.safetensors \
        --shards "data/eval/shard-{000000..000003}.tar" --classnames classes.txt --out reports/labelled
    python -m clip_train.eval --checkpoint exported/hf --imagefolder digits/ --classnames digit_words.txt \
        --templates "a photo of the number {}." --out reports/digits
    python -m clip_train.eval --checkpoint model.pt --retrieval-folder data/eval/captioned --out reports/ret
    python -m clip_train.eval --checkpoint model.pt --imagefolder data/eval/shapes --linear-probe --out r
    python -m clip_train.eval --checkpoint model.pt --imagefolder data/test --probe-train data/train --out r

Class names are the image folder's sub-folder names unless --classnames names them (line i names the i-th
sub-folder in sorted order); the run prints the names it prompts with. --templates is a built-in set, a
file of templates, or one template inline.

Outputs in --out: report.json (metrics, per-class recall, confusion matrix, the most frequent confusions,
the linear probe's accuracy and regularisation sweep), confusion_matrix.png and per_class_accuracy.png.
Top-5 accuracy is reported only with more than 5 classes: with fewer, every image's class is among the top 5
whatever the model, so report.json has "top5": null and says why under "top5_omitted".

The linear probe (`--linear-probe`) fits logistic regression on the frozen image features of a training set
and scores the classification set: the training set is `--probe-train` (an image folder with the same
classes), or, without it, a stratified `--probe-test-fraction` of the classification set is held out for
testing and the probe trains on the rest. Either way its regularisation is chosen on a validation part of
the training images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from clip_train.evaluation.cli_common import add_model_arguments, model_from_arguments, run
from clip_train.evaluation.datasets import (
    ClassificationSet,
    RetrievalSet,
    captioned_folder,
    captioned_shards,
    image_folder,
    labelled_shards,
)
from clip_train.evaluation.linear_probe import evaluate_linear_probe, split_classification_set
from clip_train.evaluation.plots import plot_confusion_matrix, plot_per_class_accuracy
from clip_train.evaluation.retrieval import evaluate_retrieval
from clip_train.evaluation.templates import builtin_template_sets, load_classnames, load_templates
from clip_train.evaluation.zero_shot import ZeroShotResult, evaluate_zero_shot

_TOP_CONFUSIONS = 20
_TOP_K = 5  # the k of ClassificationMetrics.top5
_CLASSES_SHOWN = 50  # class names printed before the run; report.json lists them all


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clip_train.eval",
        description="Zero-shot classification and retrieval of a CLIP checkpoint: JSON report, PNG plots.",
        # No ArgumentDefaultsHelpFormatter: the help texts state their defaults where there is one to state
        # (it would add "(default: None)" to required options and repeat the hand-written ones).
    )
    add_model_arguments(parser)
    data = parser.add_mutually_exclusive_group()
    data.add_argument(
        "--imagefolder", help="classification set: ROOT/<class>/<images>, classes = sub-folders"
    )
    data.add_argument(
        "--shards",
        help="classification set: labelled WebDataset shards (label in KEY.cls or KEY.json 'label')",
    )
    parser.add_argument(
        "--classnames",
        help="class-name file, one name per line: with --imagefolder, line i names the i-th sub-folder in "
        "sorted order, in place of the folder's name (default: the sub-folder names, '_' read as a space; "
        "name classes in words, e.g. 'seven' for a folder '7', for the text tower to read them); with "
        "--shards (required), line i names label i",
    )
    parser.add_argument(
        "--templates",
        default="single",
        help=f"prompt templates: a built-in set ({', '.join(builtin_template_sets())}), a file with one "
        'template per line containing {}, or one template inline, e.g. "a photo of the number {}." '
        "(default: single)",
    )
    retrieval = parser.add_mutually_exclusive_group()
    retrieval.add_argument("--retrieval-folder", help="retrieval set: images with same-named .txt captions")
    retrieval.add_argument(
        "--retrieval-shards", help="retrieval set: WebDataset shards with KEY.txt captions"
    )
    parser.add_argument(
        "--linear-probe",
        action="store_true",
        help="also score a linear probe: logistic regression on frozen image features (λ chosen on a "
        "validation part of its training images), trained on --probe-train or on part of the "
        "classification set and tested on the rest",
    )
    parser.add_argument(
        "--probe-train",
        help="the linear probe's training images: ROOT/<class>/<images>, one folder per class of the "
        "classification set, named after it (implies --linear-probe; without it, part of the "
        "classification set is held out)",
    )
    parser.add_argument(
        "--probe-test-fraction",
        type=float,
        default=0.3,
        help="without --probe-train: the fraction of each class's images the probe is tested on "
        "(default 0.3)",
    )
    parser.add_argument("--name", default="", help="dataset name in the report (default: the folder's name)")
    parser.add_argument("--out", required=True, help="output folder for report.json and the plots")
    return parser


def _classification_set(args: argparse.Namespace) -> ClassificationSet | None:
    classnames = load_classnames(args.classnames) if args.classnames else None
    if args.imagefolder:
        found = image_folder(args.imagefolder, classnames, name=args.name)
    elif args.shards:
        if classnames is None:
            raise ValueError("--shards needs --classnames (line i names label i)")
        found = labelled_shards(args.shards, classnames, name=args.name)
    else:
        return None
    if len(found.classnames) < 2:  # every image would be classified correctly, whatever the model
        raise ValueError(
            f"{args.imagefolder or args.classnames} has only 1 class ({', '.join(found.classnames)}): "
            "zero-shot classification needs at least 2"
        )
    return found


def class_list_line(classes: ClassificationSet, classnames_file: str | None) -> str:
    """The line that shows which class names the run prompts with, and where they came from."""
    names = classes.classnames
    shown = ", ".join(repr(n) for n in names[:_CLASSES_SHOWN])
    if len(names) > _CLASSES_SHOWN:
        shown += f", … ({len(names) - _CLASSES_SHOWN} more, all in report.json)"
    if classnames_file:
        return f"class names from {classnames_file}: {shown}"
    # The folder names are what the text tower reads: say so, as names like "7" score far below words.
    return f"class names from the sub-folder names (name them with --classnames FILE): {shown}"


def _retrieval_set(args: argparse.Namespace) -> RetrievalSet | None:
    if args.retrieval_folder:
        return captioned_folder(args.retrieval_folder)
    if args.retrieval_shards:
        return captioned_shards(args.retrieval_shards)
    return None


def _probe_sets(
    args: argparse.Namespace, classification: ClassificationSet | None
) -> tuple[ClassificationSet, ClassificationSet] | None:
    """(train, test) sets of the linear probe, or None when none was asked for."""
    if not (args.linear_probe or args.probe_train):
        return None
    if classification is None:
        raise ValueError("--linear-probe needs a classification set: give --imagefolder or --shards")
    if args.probe_train:
        # Classes matched by name, not position: a training folder with other classes must not be
        # relabelled silently.
        train = image_folder(args.probe_train)
        if train.classnames != classification.classnames:
            raise ValueError(
                f"--probe-train {args.probe_train}: its class folders {train.classnames} must be the "
                f"classification set's classes {classification.classnames} (folder names, '_' for spaces)"
            )
        return train, classification
    return split_classification_set(classification, args.probe_test_fraction)


def top_confusions(result: ZeroShotResult, limit: int = _TOP_CONFUSIONS) -> list[dict[str, Any]]:
    """The most frequent off-diagonal (true, predicted) pairs."""
    confusion = result.metrics.confusion.clone()
    confusion.fill_diagonal_(0)
    counts, flat = confusion.flatten().sort(descending=True)
    c = confusion.shape[0]
    return [
        {"true": result.classnames[i // c], "predicted": result.classnames[i % c], "count": n}
        for n, i in zip(counts.tolist()[:limit], flat.tolist()[:limit])
        if n > 0
    ]


def zero_shot_report(result: ZeroShotResult) -> dict[str, Any]:
    """The report's "zero_shot" entry. With 5 classes or fewer, top-5 is 1.0 whatever the model (every class
    is among the top 5): "top5" is kept, as null, for readers of the key, and "top5_omitted" says why."""
    report = {**result.to_dict(), "classnames": result.classnames, "top_confusions": top_confusions(result)}
    if len(result.classnames) <= _TOP_K:
        report["top5"] = None
        report["top5_omitted"] = _top5_omitted(len(result.classnames))
    return report


def _top5_omitted(num_classes: int) -> str:
    return f"only {num_classes} classes: every image's class is among the top {_TOP_K}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    if not (args.imagefolder or args.shards or args.retrieval_folder or args.retrieval_shards):
        raise ValueError("nothing to evaluate: give --imagefolder or --shards, and/or a --retrieval-* set")
    templates = load_templates(args.templates)
    classification = _classification_set(args)
    retrieval = _retrieval_set(args)
    probe_sets = _probe_sets(args, classification)
    out = Path(args.out)
    plan = []
    if classification is not None:
        plan.append(
            f"zero-shot on {classification.name!r} ({len(classification)} images, "
            f"{len(classification.classnames)} classes, {len(templates)} template(s))"
        )
    if probe_sets is not None:
        plan.append(
            f"linear probe trained on {probe_sets[0].name!r} ({len(probe_sets[0])} images), tested on "
            f"{probe_sets[1].name!r} ({len(probe_sets[1])} images)"
        )
    if retrieval is not None:
        plan.append(f"retrieval on {retrieval.name!r} ({len(retrieval)} images)")
    print(f"evaluating {args.checkpoint}: {'; '.join(plan)}; writing to {out}")
    if classification is not None:
        print(class_list_line(classification, args.classnames))
    model = model_from_arguments(args)
    common = {"batch_size": args.batch_size, "num_workers": args.workers, "progress": True}

    report: dict[str, Any] = {"checkpoint": str(args.checkpoint), "templates": args.templates}
    summary = []
    out.mkdir(parents=True, exist_ok=True)
    if classification is not None:
        result = evaluate_zero_shot(model, classification, templates, **common)
        report["zero_shot"] = zero_shot_report(result)
        m = result.metrics
        title = f"{result.dataset}: zero-shot top-1 {m.top1:.3f}"
        plot_confusion_matrix(m.confusion, result.classnames, out / "confusion_matrix.png", title=title)
        plot_per_class_accuracy(
            m.per_class_recall, result.classnames, out / "per_class_accuracy.png", title=title
        )
        top5 = (
            f"top-5 {m.top5:.4f}"
            if len(result.classnames) > _TOP_K
            else f"top-5 left out ({_top5_omitted(len(result.classnames))})"
        )
        summary.append(f"zero-shot top-1 {m.top1:.4f}, {top5}, mean per-class {m.mean_per_class_recall:.4f}")
    if probe_sets is not None:
        train, test = probe_sets
        probe = evaluate_linear_probe(model, train, test, **common)
        report["linear_probe"] = {
            "train": train.name,
            "test": test.name,
            "num_train": len(train),
            "num_test": len(test),
            **probe.to_dict(),
        }
        summary.append(f"linear probe top-1 {probe.accuracy:.4f} (λ={probe.l2:g})")
    if retrieval is not None:
        scores = evaluate_retrieval(model, retrieval, **common)
        report["retrieval"] = {"dataset": retrieval.name, **scores.to_dict()}
        summary.append(
            f"retrieval image→text R@1 {scores.image_to_text[1]:.4f}, "
            f"text→image R@1 {scores.text_to_image[1]:.4f}"
        )
    report["seconds"] = round(time.perf_counter() - started, 2)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'; '.join(summary)} — report and plots in {out} ({report['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    run(main)
