"""Export a CLIP model for deployment: ONNX towers, the OpenAI/OpenCLIP layout, a Hugging Face CLIPModel.

    from clip_train.checkpoints import load_model
    from clip_train.export import export_model
    files = export_model(load_model("last.ckpt"), "onnx", "exports/onnx", fp16=True)

or `python -m clip_train.export --checkpoint last.ckpt --format onnx --out exports/onnx --fp16`.
Each format refuses, by name, a model it cannot express (a ResNet image tower in CLIPModel, heads other than
width // 64 in the OpenAI layout, ...) before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from clip_train.export.files import (
    ExportedFile,
    ExportError,
    check_output_dir,
    human_size,
    prepare_output_dir,
)
from clip_train.export.huggingface import (
    check_huggingface_expressible,
    check_tokenizer_fits,
    export_huggingface,
)
from clip_train.export.onnx_export import OnnxAgreement, OnnxTowerExport, export_onnx, write_onnx_metadata
from clip_train.export.openai_export import check_openai_expressible, export_openai
from clip_train.models import CLIP
from clip_train.tokenizer import Tokenizer

FORMATS = ("onnx", "openai", "huggingface")

__all__ = [
    "FORMATS",
    "ExportError",
    "ExportedFile",
    "OnnxAgreement",
    "OnnxTowerExport",
    "check_exportable",
    "check_output_dir",
    "export_huggingface",
    "export_model",
    "export_onnx",
    "export_openai",
    "human_size",
    "prepare_output_dir",
    "write_onnx_metadata",
]


def check_exportable(model: CLIP, format: str, tokenizer: Tokenizer | None = None) -> None:
    """Raise `ExportError` for an unknown format, a model that the format cannot express, or a `tokenizer`
    (whose files the onnx and huggingface formats write) that does not fit the model."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; formats: {', '.join(FORMATS)}")
    if not isinstance(model, CLIP):
        raise ExportError(f"expected a clip_train CLIP model, got {type(model).__name__}")
    if format == "openai":
        check_openai_expressible(model)
    elif format == "huggingface":
        check_huggingface_expressible(model, tokenizer)
    elif tokenizer is not None:
        check_tokenizer_fits(model, tokenizer)


def export_model(
    model: CLIP,
    format: str,
    out_dir: str | Path,
    *,
    fp16: bool = False,
    overwrite: bool = False,
    tokenizer: Tokenizer | None = None,
) -> list[ExportedFile]:
    """Export `model` in `format` ("onnx", "openai" or "huggingface") into `out_dir`, float16 weights
    with `fp16`; returns the files written. The model and the output folder are checked first (see
    `check_exportable`, `prepare_output_dir`), so a refused export writes nothing. `tokenizer` (onnx and
    huggingface): the one whose files to write beside the model, default the standard BPE vocabulary."""
    check_exportable(model, format, tokenizer)
    if format != "openai" and tokenizer is None:  # check the default's fit before writing anything
        tokenizer = Tokenizer(context_length=model.context_length)
        check_exportable(model, format, tokenizer)
    out = prepare_output_dir(out_dir, overwrite=overwrite)
    if format == "onnx":
        graphs = export_onnx(model, out, fp16=fp16)
        return [*graphs, *write_onnx_metadata(model, out, fp16=fp16, tokenizer=tokenizer)]
    if format == "openai":
        return export_openai(model, out, fp16=fp16)
    return export_huggingface(model, out, fp16=fp16, tokenizer=tokenizer)
