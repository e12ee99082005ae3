"""What the evaluation CLIs (clip_train.eval, .predict, .search) share: the model arguments, loading the
model, and turning a bad input into one clear error line (exit status 2) instead of a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from clip_train.checkpoints import check_checkpoint_path, load_model
from clip_train.models import CLIP
from clip_train.models.openai_layout import CheckpointError

CHECKPOINT_HELP = (
    "model: our trainer's .ckpt, save_model's .pt, an OpenAI/OpenCLIP .pt/.bin/.safetensors, or a Hugging "
    "Face CLIPModel folder (config.json + model.safetensors, as clip_train.export writes it)"
)
QUICK_GELU_HELP = (
    "activation of an OpenAI-layout file, which does not record it (default auto: from .safetensors "
    "metadata, else QuickGELU as in OpenAI's release); ignored for the checkpoints that record it (ours, "
    "Hugging Face folders)"
)


def checkpoint_file(value: str) -> str:
    """The `type=` of a --checkpoint option: a missing path, a file that is no checkpoint by its first bytes
    (an image, a text file) or a folder that holds no Hugging Face CLIPModel is refused while the arguments
    are parsed (`check_checkpoint_path`), before a CLI prints a plan line that would claim to be using it
    or spends time on its other inputs. Returns `value` unchanged."""
    try:
        check_checkpoint_path(value)
    except (FileNotFoundError, CheckpointError) as exc:
        # argparse shows an ArgumentTypeError's own message; any other error becomes "invalid value".
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument(
        "--checkpoint",
        required=required,
        type=checkpoint_file,
        help=CHECKPOINT_HELP,
    )
    parser.add_argument(
        "--quick-gelu", choices=("auto", "true", "false"), default="auto", help=QUICK_GELU_HELP
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--workers", type=int, default=0, help="image decoding processes (default 0: inline)")


def model_from_arguments(args: argparse.Namespace) -> CLIP:
    quick_gelu = {"auto": None, "true": True, "false": False}[args.quick_gelu]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(args.checkpoint, quick_gelu=quick_gelu).to(device)


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run a CLI's main; a bad input (missing file, bad checkpoint, undecodable image, bad template…)
    ends with `error: <message>` and exit status 2."""
    try:
        status = main(argv)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status)
