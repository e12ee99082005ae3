"""`python -m clip_train.export`: write a checkpoint as ONNX towers, an OpenAI/OpenCLIP-layout file, or a
Hugging Face CLIPModel folder.

    python -m clip_train.export --checkpoint runs/vit_tiny/checkpoints/last.ckpt --format onnx --out exp/onnx
    python -m clip_train.export --checkpoint last.ckpt --format huggingface --out exp/hf --fp16
    python -m clip_train.export --checkpoint last.ckpt --format openai --out exp/openclip
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from clip_train.checkpoints import load_model
from clip_train.evaluation.cli_common import CHECKPOINT_HELP, QUICK_GELU_HELP, checkpoint_file
from clip_train.export import FORMATS, check_exportable, export_model, human_size, prepare_output_dir
from clip_train.export.files import ExportedFile, check_output_dir
from clip_train.export.onnx_export import TOWERS, export_onnx, write_onnx_metadata
from clip_train.models import CLIP, ModifiedResNetConfig
from clip_train.tokenizer import Tokenizer

_DESCRIPTIONS = {
    "onnx": "image and text towers as separate ONNX graphs (dynamic batch), each checked in onnxruntime, "
    "with onnx_config.json (preprocessing, context length) and the tokenizer files",
    "openai": "OpenAI/OpenCLIP state-dict layout (open_clip_model.safetensors + open_clip_config.json)",
    "huggingface": "Hugging Face transformers CLIPModel folder (config, safetensors weights, tokenizer)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clip_train.export",
        description="Export a CLIP checkpoint for deployment. Formats: "
        + "; ".join(f"{name}: {text}" for name, text in _DESCRIPTIONS.items()),
        # No ArgumentDefaultsHelpFormatter: it adds "(default: None)" to required options and repeats the
        # defaults the help texts already state.
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=checkpoint_file,
        help=CHECKPOINT_HELP,
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument(
        "--out", required=True, help="output folder (created; must be new or empty, unless --overwrite)"
    )
    parser.add_argument(
        "--fp16", action="store_true", help="float16 weights, half the size (default: float32)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out, replacing files of the same names (others are left alone)",
    )
    parser.add_argument(
        "--quick-gelu",
        choices=("auto", "true", "false"),
        default="auto",
        help=QUICK_GELU_HELP,
    )
    parser.add_argument(
        "--bpe",
        default=None,
        help="onnx, huggingface: the BPE merges file the model was trained with, whose tokenizer files are "
        "written beside the model (default: the standard CLIP one)",
    )
    return parser


def describe(model: CLIP) -> str:
    """ "ViT image tower, 5.1 M parameters" — what the plan line says about the model."""
    kind = "ResNet" if isinstance(model.config.vision, ModifiedResNetConfig) else "ViT"
    params = sum(p.numel() for p in model.parameters())
    return f"{kind} image tower, {params / 1e6:.1f} M parameters"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    precision = "fp16" if args.fp16 else "fp32"
    # Before the seconds spent loading the model (--checkpoint was checked while parsing).
    check_output_dir(out, overwrite=args.overwrite, out_name="--out", overwrite_name="--overwrite")
    quick_gelu = {"auto": None, "true": True, "false": False}[args.quick_gelu]
    model = load_model(args.checkpoint, quick_gelu=quick_gelu)
    tokenizer = None
    if args.format != "openai":  # its files are written beside the model
        tokenizer = Tokenizer(args.bpe, context_length=model.context_length)
    check_exportable(model, args.format, tokenizer)
    print(
        f"exporting {args.checkpoint} ({describe(model)}) as {args.format} {precision} "
        f"({_DESCRIPTIONS[args.format]}) to {out}",
        flush=True,
    )
    files: list[ExportedFile]
    if args.format == "onnx":  # seconds per tower: report each as it is done
        prepare_output_dir(out, overwrite=args.overwrite)
        files = []
        for tower in TOWERS:
            (result,) = export_onnx(model, out, fp16=args.fp16, towers=[tower])
            print(
                f"  {result.path.name}: {human_size(result.size_bytes)}; onnxruntime vs PyTorch: "
                f"{result.agreement}",
                flush=True,
            )
            files.append(result)
        files += write_onnx_metadata(model, out, fp16=args.fp16, tokenizer=tokenizer)
    else:
        files = export_model(
            model, args.format, out, fp16=args.fp16, overwrite=args.overwrite, tokenizer=tokenizer
        )
    total = sum(f.size_bytes for f in files)
    listing = ", ".join(f"{f.path.name} {human_size(f.size_bytes)}" for f in files)
    print(
        f"exported {len(files)} files ({human_size(total)}) to {out} in "
        f"{time.perf_counter() - started:.1f} s: {listing}"
    )
    return 0
