"""Distillation end to end on real shards: the student moves towards the teacher, side files replace the
teacher's forward pass, the Hydra experiment trains through `clip_train.train`, and bad set-ups fail
clearly."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from data_support import write_crawler_shards
from hydra import compose, initialize_config_dir

from clip_train.checkpoints import load_model, save_model
from clip_train.data import WebDatasetDataModule
from clip_train.distillation import (
    DistillationLoss,
    DistillationModule,
    EmbeddingSizeError,
    TeacherEmbeddingError,
    build_student,
    load_side_files,
    precompute,
    report,
    side_file,
)
from clip_train.models import build_model
from clip_train.train import CONFIG_DIR, train
from clip_train.training.preflight import ConfigError


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, str, Path]:
    root = tmp_path_factory.mktemp("distill")
    shards = write_crawler_shards(root / "shards", [48, 48], image_size=40)
    torch.manual_seed(0)
    teacher = save_model(build_model("vit-tiny"), root / "teacher.pt")
    return root, shards, teacher


def _datamodule(shards: str, batch_size: int = 16) -> WebDatasetDataModule:
    return WebDatasetDataModule(
        train_shards=shards, batch_size=batch_size, num_workers=0, image_size=32, context_length=77,
        crop_scale=(1.0, 1.0), seed=0,
    )  # fmt: skip


def _fit(module: DistillationModule, shards: str, epochs: int = 1) -> None:
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=_datamodule(shards))


@torch.no_grad()
def _cosine_to_teacher(student, teacher, images) -> float:
    s = F.normalize(student.encode_image(images), dim=-1)
    t = F.normalize(teacher.encode_image(images), dim=-1)
    return float((s * t).sum(dim=1).mean())


def _images(shards: str) -> torch.Tensor:
    datamodule = _datamodule(shards, batch_size=32)
    datamodule.setup()
    return next(iter(datamodule.train_dataloader()))[0]


@pytest.mark.slow
def test_distillation_moves_the_student_towards_the_teacher_and_keeps_its_text_tower(setup):
    _, shards, teacher_path = setup
    torch.manual_seed(0)
    student = build_student(teacher_path)
    teacher = load_model(teacher_path)
    images = _images(shards)
    before = _cosine_to_teacher(student, teacher, images)
    optimizer = functools.partial(torch.optim.AdamW, lr=3e-3)
    module = DistillationModule(student, DistillationLoss(temperature=2.0), optimizer, teacher=teacher_path)
    _fit(module, shards, epochs=3)  # 18 steps
    after = _cosine_to_teacher(student, teacher, images)
    assert after > before + 0.2, (before, after)
    for name, value in teacher.text.state_dict().items():
        assert torch.equal(student.text.state_dict()[name], value), name  # frozen, the teacher's
    assert "teacher" not in dict(module.named_modules())  # the teacher is neither trained nor saved


@pytest.mark.slow
def test_side_files_hold_the_teachers_embeddings_and_train_through_the_experiment(setup, tmp_path, capsys):
    root, shards, teacher_path = setup
    assert precompute.main(["--teacher", str(teacher_path), "--shards", str(root / "shards")]) == 0
    assert "wrote 2 side file(s), 96 samples" in capsys.readouterr().out
    first_shard = shards.replace("{000000..000001}", "000000")
    with np.load(side_file(first_shard)) as archive:
        assert archive["image"].shape == (48, 64) and archive["image"].dtype == np.float16
    table = load_side_files([first_shard])
    # The side file equals the teacher's forward pass on the same (centre-cropped) images.
    datamodule = _datamodule(first_shard, batch_size=8)
    datamodule.setup()
    images, tokens, info = next(iter(datamodule.train_dataloader()))
    teacher = load_model(teacher_path)
    with torch.no_grad():
        expected = F.normalize(teacher.encode_image(images), dim=-1)
        expected_text = F.normalize(teacher.encode_text(tokens), dim=-1)
    image, text = table.lookup(info["keys"])
    assert F.cosine_similarity(image, expected).min() > 0.999
    assert F.cosine_similarity(text, expected_text).min() > 0.999

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[
            "+experiment=distill_demo", f"teacher={teacher_path}", f"data.train_shards='{shards}'",
            "data.num_workers=1", f"paths.root_dir={tmp_path}", f"paths.run_dir={tmp_path}/run",
            "global_batch_size=16", "trainer.max_epochs=1", "module.teacher_embeddings=true",
            "scheduler.warmup_steps=2", "~callbacks.progress", "logger=none",
        ])  # fmt: skip
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and metrics["distill/temperature"] == 4.0
    student = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert student.config.vision.width == 64 and student.config.vision.layers == 1
    assert not any(
        k.startswith("teacher") for k in torch.load(tmp_path / "run/checkpoints/last.ckpt")["state_dict"]
    )

    student_path = str(tmp_path / "run/checkpoints/last.ckpt")
    args = ["--teacher", str(teacher_path), "--student", student_path, "--shards", shards, "--k", "5"]
    assert report.main([*args, "--json", str(tmp_path / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "caption→image agreement over 96 queries" in out and (tmp_path / "report.json").is_file()


def test_side_files_of_another_teacher_are_refused(setup):
    root, shards, teacher_path = setup
    first_shard = shards.replace("{000000..000001}", "000000")
    if not side_file(first_shard).is_file():
        precompute.main(["--teacher", str(teacher_path), "--shards", first_shard])
    with pytest.raises(TeacherEmbeddingError, match="another teacher"):
        load_side_files([first_shard], fingerprint="0" * 64)
    with pytest.raises(TeacherEmbeddingError, match="precompute"):
        load_side_files([str(root / "shards" / "shard-000009.tar")])


def test_skipped_samples_are_counted_and_keys_must_be_unique_across_shards(setup, tmp_path, capsys):
    _, _, teacher_path = setup
    bad = write_crawler_shards(tmp_path / "a", [6], image_size=40, corrupt={"0000x00003"})
    again = write_crawler_shards(tmp_path / "b", [6], image_size=40)  # the same keys as a's shard
    assert precompute.main(["--teacher", str(teacher_path), "--shards", bad]) == 0
    assert "5 samples (1 skipped)" in capsys.readouterr().out
    assert precompute.main(["--teacher", str(teacher_path), "--shards", again]) == 0
    bad, again = (pattern.replace("{000000..000000}", "000000") for pattern in (bad, again))
    table = load_side_files([bad])
    table.lookup(["0000x00002", "0000x00004"])
    with pytest.raises(TeacherEmbeddingError, match="'0000x00003' has no teacher embedding"):
        table.lookup(["0000x00002", "0000x00003"])
    with pytest.raises(TeacherEmbeddingError, match="'0000x00000' occurs in two shards"):
        load_side_files([bad, again])


def test_different_embedding_sizes_need_a_projection(setup):
    _, shards, teacher_path = setup
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    narrow = build_student(teacher_path, embed_dim=32)  # a 32-d student for a 64-d teacher
    with pytest.raises(EmbeddingSizeError, match="image tower alone"):
        DistillationModule(narrow, DistillationLoss(), optimizer, teacher=teacher_path)
    with pytest.raises(EmbeddingSizeError, match="projection=true"):
        DistillationModule(narrow, DistillationLoss(), optimizer, teacher=teacher_path, train_text=True)
    module = DistillationModule(narrow, DistillationLoss(), optimizer, teacher=teacher_path, train_text=True,
                                projection=True)  # fmt: skip
    start = module.projection.weight.detach().clone()
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=_datamodule(shards))
    assert not torch.equal(module.projection.weight, start)  # the projection is optimised with the student
    other = build_student(build_model("vit-tiny"))  # another teacher's text tower
    with pytest.raises(ValueError, match="text tower"):
        DistillationModule(other, DistillationLoss(), optimizer, teacher=teacher_path)


def test_the_distillation_experiments_compose():
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        tiny = compose("train", overrides=["+experiment=distill_demo", "teacher=t.pt"])
        b32 = compose(
            "train", overrides=["+experiment=distill_vit_b32", "teacher=ViT-B-32.pt", "data.train_shards=x"]
        )
    assert tiny.model.teacher == "t.pt" and tiny.module.teacher == "t.pt" and tiny.run_name == "distill_demo"
    assert [list(m) for m in b32.loss.temperature] == [[0, 4.0], [5, 2.0]]
    assert b32.model.width_ratio == 0.5 and b32.model.depth_ratio == 0.5 and b32.module.teacher_embeddings


def _refused_before_training(tmp_path: Path, shards: str, *overrides: str, match: str) -> None:
    """`+experiment=distill_demo` on `shards` with `overrides` stops with a ConfigError matching `match`,
    before any checkpoint is written."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[
            "+experiment=distill_demo", f"data.train_shards='{shards}'", f"paths.root_dir={tmp_path}",
            f"paths.run_dir={tmp_path}/run", *overrides,
        ])  # fmt: skip
    with pytest.raises(ConfigError, match=match):
        train(cfg)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


def test_distillation_under_a_sharded_strategy_is_refused_before_training(setup, tmp_path):
    _, shards, teacher_path = setup
    _refused_before_training(
        tmp_path, shards, f"teacher={teacher_path}", "trainer=fsdp", "trainer.accelerator=cpu",
        # tests/sharded_on_cpu.py: FSDP allowed on a CPU
        "trainer.strategy._target_=sharded_on_cpu.FSDPOnCPU", "module.gradient_clip_norm=null",
        match="DistillationModule does not run under FSDPOnCPU",
    )  # fmt: skip


def test_validation_shards_with_distillation_are_refused_before_training(setup, tmp_path):
    _, shards, teacher_path = setup
    _refused_before_training(
        tmp_path, shards, f"teacher={teacher_path}", f"data.val_shards='{shards}'",
        match=r"DistillationModule has no validation .*=null\)",
    )  # fmt: skip


def test_a_missing_teacher_is_refused_before_training_saying_how_to_name_one(setup, tmp_path):
    _, shards, _ = setup
    _refused_before_training(
        tmp_path, shards, match=r"teacher checkpoint .*last\.ckpt not found: pass teacher=PATH"
    )
