"""Evaluation of CLIP models: zero-shot classification, retrieval, linear probes, and a training callback.

    from clip_train.checkpoints import load_model
    from clip_train.evaluation import evaluate_zero_shot, image_folder, load_templates

    model = load_model("runs/vit_tiny/checkpoints/last.ckpt")
    result = evaluate_zero_shot(model, image_folder("data/eval"), load_templates("imagenet80"))
    print(result.metrics.top1)

CLIs: `python -m clip_train.eval`, `python -m clip_train.predict`, `python -m clip_train.search`.
"""

from clip_train.evaluation.datasets import (
    ClassificationSet,
    DatasetError,
    ImageRef,
    RetrievalSet,
    captioned_folder,
    captioned_shards,
    image_folder,
    labelled_shards,
    labels_file_set,
    list_images,
    shard_images,
)
from clip_train.evaluation.embedding import embed_images, embed_texts, tokenizer_for
from clip_train.evaluation.linear_probe import (
    LinearProbeResult,
    evaluate_linear_probe,
    fit_logistic_regression,
    linear_probe,
    split_classification_set,
)
from clip_train.evaluation.retrieval import RetrievalMetrics, evaluate_retrieval, retrieval_metrics
from clip_train.evaluation.templates import TemplateError, load_classnames, load_templates
from clip_train.evaluation.zero_shot import (
    ClassificationMetrics,
    ZeroShotResult,
    caption_probabilities,
    classification_metrics,
    evaluate_zero_shot,
    zero_shot_classifier,
)

__all__ = [
    "ClassificationMetrics",
    "ClassificationSet",
    "DatasetError",
    "ImageRef",
    "LinearProbeResult",
    "RetrievalMetrics",
    "RetrievalSet",
    "TemplateError",
    "ZeroShotResult",
    "caption_probabilities",
    "captioned_folder",
    "captioned_shards",
    "classification_metrics",
    "embed_images",
    "embed_texts",
    "evaluate_linear_probe",
    "evaluate_retrieval",
    "evaluate_zero_shot",
    "fit_logistic_regression",
    "image_folder",
    "labelled_shards",
    "labels_file_set",
    "linear_probe",
    "list_images",
    "load_classnames",
    "load_templates",
    "retrieval_metrics",
    "shard_images",
    "split_classification_set",
    "tokenizer_for",
    "zero_shot_classifier",
]
