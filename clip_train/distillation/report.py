"""How a distilled student compares with its teacher: size, speed and agreement.

* size: image-tower parameters of both, their ratio, and the student's image tower in MB at fp32 and fp16
  (and the whole student's parameters);
* speed: image-tower forward time of each on the CPU, same batch, median of several runs, and the ratio;
* agreement on a set of images (and their captions, from shards): for every query, the overlap of the
  student's top-k results with the teacher's (|S ∩ T| / k), and the average precision of the student's full
  ranking when the teacher's top-k are the relevant items (mAP over queries). Image queries search the other
  images (the query itself left out); caption queries search the images;
* zero-shot accuracy of both on labelled images — a folder ROOT/<class>/<images>, or a JSON list of records
  naming each image's file and class, such as the demo's eval/labels.json — and the student's share of
  the teacher's.

    python -m clip_train.distillation.report --teacher demo/runs/demo/checkpoints/last.ckpt \\
        --student demo/runs/distill_demo/checkpoints/last.ckpt --shards demo/shards \\
        --zero-shot demo/eval/labels.json --label-key shape
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from clip_train.checkpoints import load_model
from clip_train.distillation.student import image_tower_parameters
from clip_train.evaluation import (
    captioned_shards,
    embed_images,
    embed_texts,
    evaluate_zero_shot,
    image_folder,
    labels_file_set,
    list_images,
    load_templates,
    tokenizer_for,
)
from clip_train.evaluation.cli_common import run
from clip_train.models import CLIP


@dataclass
class RetrievalAgreement:
    queries: int
    k: int
    top_k_overlap: float  # mean |student top-k ∩ teacher top-k| / k
    map_at_teacher: float  # mean AP of the student's ranking with the teacher's top-k as relevant


@dataclass
class DistillationReport:
    teacher_image_params: int
    student_image_params: int
    image_param_ratio: float
    student_image_mb_fp32: float
    student_image_mb_fp16: float
    student_total_params: int
    teacher_ms_per_batch: float
    student_ms_per_batch: float
    speedup: float
    speed_batch_size: int
    image_to_image: RetrievalAgreement | None = None
    text_to_image: RetrievalAgreement | None = None
    teacher_zero_shot_top1: float | None = None
    student_zero_shot_top1: float | None = None
    zero_shot_retention: float | None = None  # student top-1 / teacher top-1

    def to_dict(self) -> dict:
        return asdict(self)


def tower_megabytes(model: CLIP, bytes_per_param: int) -> float:
    """The image tower's weights in MB (10⁶ bytes) at `bytes_per_param` (4: fp32, 2: fp16)."""
    return image_tower_parameters(model) * bytes_per_param / 1e6


@torch.no_grad()
def image_tower_ms(model: CLIP, batch_size: int = 32, repeats: int = 5, seed: int = 0) -> float:
    """Median milliseconds of one image-tower forward pass over a (batch_size, 3, S, S) batch, on the CPU
    (one warm-up run first)."""
    model = model.eval().to("cpu")
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, model.image_size, model.image_size, generator=g)
    model.encode_image(images)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.encode_image(images)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def ranking_agreement(
    teacher_scores: Tensor, student_scores: Tensor, k: int = 10, exclude: Tensor | None = None
) -> RetrievalAgreement:
    """Agreement of two (Q, N) score matrices (query × gallery): top-k overlap and mAP of the student's
    ranking against the teacher's top-k. `exclude`: a (Q, N) bool mask of pairs to leave out (a query's
    own image)."""
    if teacher_scores.shape != student_scores.shape:
        raise ValueError(
            f"score matrices differ in shape: {tuple(teacher_scores.shape)} vs {tuple(student_scores.shape)}"
        )
    q, n = teacher_scores.shape
    available = n - (int(exclude[0].sum()) if exclude is not None else 0)
    if not 1 <= k <= available:
        raise ValueError(f"k must lie in [1, {available}] (the gallery size), got {k}")
    t, s = teacher_scores.double(), student_scores.double()
    if exclude is not None:
        t, s = t.masked_fill(exclude, float("-inf")), s.masked_fill(exclude, float("-inf"))
    relevant = torch.zeros(q, n, dtype=torch.bool)
    relevant.scatter_(1, t.topk(k, dim=1).indices, True)  # the teacher's top-k
    order = s.argsort(dim=1, descending=True)  # the student's ranking
    hits = relevant.gather(1, order)  # (Q, N): is the student's r-th result one of the teacher's top-k
    overlap = hits[:, :k].sum(dim=1).double() / k
    found = hits.cumsum(dim=1).double()  # relevant items among the student's first r + 1
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    average_precision = (hits * found / ranks).sum(dim=1) / k
    return RetrievalAgreement(q, k, float(overlap.mean()), float(average_precision.mean()))


def distillation_report(
    teacher: CLIP,
    student: CLIP,
    *,
    images: list | None = None,
    captions: list[str] | None = None,
    zero_shot_set=None,
    templates: list[str] | None = None,
    k: int = 10,
    speed_batch_size: int = 32,
    batch_size: int = 64,
) -> DistillationReport:
    """Everything of the module docstring; `images` (ImageRefs) and `captions` (one per image, optional)
    for agreement, `zero_shot_set` (a ClassificationSet) for the zero-shot gap."""
    teacher_params, student_params = image_tower_parameters(teacher), image_tower_parameters(student)
    teacher_ms = image_tower_ms(teacher, speed_batch_size)
    student_ms = image_tower_ms(student, speed_batch_size)
    report = DistillationReport(
        teacher_image_params=teacher_params,
        student_image_params=student_params,
        image_param_ratio=student_params / teacher_params,
        student_image_mb_fp32=tower_megabytes(student, 4),
        student_image_mb_fp16=tower_megabytes(student, 2),
        student_total_params=sum(p.numel() for p in student.parameters()),
        teacher_ms_per_batch=teacher_ms,
        student_ms_per_batch=student_ms,
        speedup=teacher_ms / student_ms,
        speed_batch_size=speed_batch_size,
    )
    if images:
        t_img = embed_images(teacher, images, batch_size=batch_size)
        s_img = embed_images(student, images, batch_size=batch_size)
        n = len(images)
        if n > 1:
            own = torch.eye(n, dtype=torch.bool)
            report.image_to_image = ranking_agreement(t_img @ t_img.T, s_img @ s_img.T, min(k, n - 1), own)
        if captions:
            if len(captions) != n:
                raise ValueError(f"{len(captions)} captions for {n} images")
            t_txt = embed_texts(teacher, tokenizer_for(teacher), captions)
            s_txt = embed_texts(student, tokenizer_for(student), captions)
            report.text_to_image = ranking_agreement(t_txt @ t_img.T, s_txt @ s_img.T, min(k, n))
    if zero_shot_set is not None:
        templates = templates or ["a photo of a {}."]
        t_top1 = evaluate_zero_shot(teacher, zero_shot_set, templates, batch_size=batch_size).metrics.top1
        s_top1 = evaluate_zero_shot(student, zero_shot_set, templates, batch_size=batch_size).metrics.top1
        report.teacher_zero_shot_top1, report.student_zero_shot_top1 = float(t_top1), float(s_top1)
        report.zero_shot_retention = float(s_top1) / float(t_top1) if t_top1 > 0 else float("nan")
    return report


def format_report(report: DistillationReport) -> str:
    rows = [
        ("image-tower parameters", f"{report.teacher_image_params:,}", f"{report.student_image_params:,}",
         f"{report.image_param_ratio:.3f}"),
        ("image tower fp32 MB", f"{report.teacher_image_params * 4 / 1e6:.2f}",
         f"{report.student_image_mb_fp32:.2f}",
         f"{report.image_param_ratio:.3f}"),
        ("image tower fp16 MB", f"{report.teacher_image_params * 2 / 1e6:.2f}",
         f"{report.student_image_mb_fp16:.2f}",
         f"{report.image_param_ratio:.3f}"),
        (f"CPU ms / batch of {report.speed_batch_size}", f"{report.teacher_ms_per_batch:.1f}",
         f"{report.student_ms_per_batch:.1f}", f"{1 / report.speedup:.3f}"),
    ]  # fmt: skip
    if report.teacher_zero_shot_top1 is not None:
        zero_shot = (report.teacher_zero_shot_top1, report.student_zero_shot_top1, report.zero_shot_retention)
        rows.append(("zero-shot top-1", *(f"{v:.3f}" for v in zero_shot)))
    lines = [f"{'':32} {'teacher':>14} {'student':>14} {'student/teacher':>16}"]
    lines += [f"{a:32} {b:>14} {c:>14} {d:>16}" for a, b, c, d in rows]
    for name, agreement in (("image→image", report.image_to_image), ("caption→image", report.text_to_image)):
        if agreement is not None:
            lines.append(
                f"{name} agreement over {agreement.queries} queries: top-{agreement.k} overlap "
                f"{agreement.top_k_overlap:.3f}, mAP vs the teacher's top-{agreement.k} "
                f"{agreement.map_at_teacher:.3f}"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clip_train.distillation.report",
        description="Compare a distilled student with its teacher: size, CPU speed, retrieval agreement and "
        "zero-shot accuracy.",
    )
    parser.add_argument("--teacher", required=True, help="teacher checkpoint")
    parser.add_argument(
        "--student", required=True, help="student checkpoint (e.g. the distillation run's last.ckpt)"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", help="folder of images for the agreement measures")
    source.add_argument(
        "--shards", help="captioned shards (pattern or folder with manifest.json): image and caption queries"
    )
    parser.add_argument(
        "--max-images", type=int, default=2000, help="use at most this many images (default 2000)"
    )
    parser.add_argument(
        "--zero-shot",
        help="labelled images for the zero-shot gap: a folder ROOT/<class>/<images>, or a .json list of "
        'records {"file": ..., LABEL_KEY: class name}',
    )
    parser.add_argument(
        "--label-key", default="label", help="the class field of a .json --zero-shot (default 'label')"
    )
    parser.add_argument(
        "--templates", default="single", help="prompt templates: single | imagenet80 | a file"
    )
    parser.add_argument("--k", type=int, default=10, help="top-k of the agreement measures (default 10)")
    parser.add_argument(
        "--speed-batch-size", type=int, default=32, help="batch of the CPU timing (default 32)"
    )
    parser.add_argument("--json", help="also write the report to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    teacher, student = load_model(args.teacher), load_model(args.student)
    images, captions = None, None
    if args.images:
        images = list_images(args.images)[: args.max_images]
    elif args.shards:
        retrieval = captioned_shards(args.shards)
        images = retrieval.images[: args.max_images]
        captions = [c[0] for c in retrieval.captions[: args.max_images]]
    zero_shot_set, zero_shot_note = None, ""
    if args.zero_shot:
        zero_shot_set = (
            labels_file_set(args.zero_shot, args.label_key)
            if Path(args.zero_shot).suffix == ".json"
            else image_folder(args.zero_shot)
        )
        zero_shot_note = f", zero-shot on {zero_shot_set.name} ({len(zero_shot_set)} images)"
    print(f"comparing {args.student} with {args.teacher}: {len(images or [])} images{zero_shot_note}")
    report = distillation_report(
        teacher,
        student,
        images=images,
        captions=captions,
        zero_shot_set=zero_shot_set,
        templates=load_templates(args.templates) if zero_shot_set is not None else None,
        k=args.k,
        speed_batch_size=args.speed_batch_size,
    )
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    print(
        f"student: {report.image_param_ratio:.1%} of the teacher's image-tower parameters, "
        f"{report.speedup:.2f}× its CPU speed; report in {time.perf_counter() - start:.1f} s"
        + (f", written to {args.json}" if args.json else "")
    )
    return 0


if __name__ == "__main__":
    run(main)
