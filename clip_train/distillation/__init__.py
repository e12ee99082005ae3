"""Distillation of a CLIP teacher into a smaller student (PicCollage's recipe: half the width and half the
depth of the image tower, KL between similarity distributions at a temperature plus L1 between embeddings).

    from clip_train.distillation import DistillationLoss, DistillationModule, build_student

    student = build_student("teacher.ckpt")                       # half width, half depth, same heads
    module = DistillationModule(student, DistillationLoss(), optimizer, teacher="teacher.ckpt")

Training: `python -m clip_train +experiment=distill_demo teacher=PATH`. CLIs:
`python -m clip_train.distillation.precompute` (teacher side files next to the shards) and
`python -m clip_train.distillation.report` (size, speed and agreement of a student with its teacher).
"""

from clip_train.distillation.loss import (
    DistillationLoss,
    DistillationLossOutput,
    EmbeddingSizeError,
    TemperatureSchedule,
    embedding_l1,
    similarity_kl,
)
from clip_train.distillation.module import DistillationModule
from clip_train.distillation.student import (
    build_student,
    image_tower_parameters,
    load_teacher,
    student_config,
)
from clip_train.distillation.teacher_embeddings import (
    TeacherEmbeddingError,
    TeacherEmbeddingTable,
    load_side_files,
    side_file,
    teacher_fingerprint,
)

__all__ = [
    "DistillationLoss",
    "DistillationLossOutput",
    "DistillationModule",
    "EmbeddingSizeError",
    "TeacherEmbeddingError",
    "TeacherEmbeddingTable",
    "TemperatureSchedule",
    "build_student",
    "embedding_l1",
    "image_tower_parameters",
    "load_side_files",
    "load_teacher",
    "side_file",
    "similarity_kl",
    "student_config",
    "teacher_fingerprint",
]
