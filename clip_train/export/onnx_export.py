"""ONNX graphs of CLIP's image and text towers, exported separately and checked in onnxruntime.

    image_tower.onnx  images  float32 (B, 3, S, S), normalised pixels  → image_embeds, image_features
    text_tower.onnx   tokens  int64   (B, context_length), our ids    → text_embeds, text_features

`*_embeds` are L2-normalised (B, embed_dim) float32 (what retrieval compares), `*_features` the unnormalised
projections (`CLIP.encode_image` / `encode_text`). The batch axis is dynamic; S and the context length are
fixed (tokenize with the model's context length).

Beside the graphs, `write_onnx_metadata` puts what a caller needs to feed them without clip_train:
onnx_config.json (the graphs' inputs and outputs; the image preprocessing: RGB, short side resized to S
with bicubic resampling, centre S × S crop, pixels / 255, then (x - mean) / std per channel, channels first;
the tokenizer's context length and special ids; the logit scale), the tokenizer files (vocab.json and
merges.txt, the BPE vocabulary, with tokenizer_config.json and special_tokens_map.json for transformers'
CLIPTokenizer) and preprocessor_config.json (for transformers' CLIPImageProcessor), as the Hugging Face
export writes them.

fp16 files hold float16 weights and compute in float16, with float32 inputs and outputs: casts sit at the
graph's boundaries, so a caller feeds the same arrays to either file, and the final L2 normalisation runs in
float32. onnxruntime's CPU provider runs these graphs as they are.

The exporter is torch.onnx's torch.export-based one (the default since torch 2.9; needs `onnxscript`). The
deprecated TorchScript exporter writes an fp16 text tower that onnxruntime refuses to load (a LayerNorm typed
float32 for its input and float16 for its weights), so it is not used.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clip_train.data.transforms import CLIP_MEAN, CLIP_STD
from clip_train.export.files import ExportedFile, ExportError
from clip_train.export.huggingface import (
    check_tokenizer_fits,
    huggingface_tokenizer_files,
    image_processor_config,
)
from clip_train.models import CLIP
from clip_train.tokenizer import Tokenizer

TOWERS = ("image", "text")
FP32_MAX_ABS_DIFF = 1e-4  # largest |onnxruntime - PyTorch| allowed in any embedding component, fp32 graphs
FP16_MIN_COSINE = 0.999  # smallest cosine similarity allowed between an fp16 graph's embedding and PyTorch's
_EXPORT_BATCH = 2  # traced with 2, checked with 3: a batch size other than the traced one proves the axis
_CHECK_BATCH = 3
# One protobuf file holds at most 2 GiB; larger towers (ViT-bigG's) keep their weights in a .data file.
_EXTERNAL_DATA_BYTES = 1_800_000_000
METADATA_FILE = "onnx_config.json"
_IO_NAMES = {
    "image": ("images", ("image_embeds", "image_features")),
    "text": ("tokens", ("text_embeds", "text_features")),
}


@dataclass(frozen=True)
class OnnxAgreement:
    """onnxruntime against the float32 PyTorch model on `batch_size` random inputs, over the normalised
    embeddings: the largest absolute difference of any component and the smallest per-row cosine."""

    max_abs_diff: float
    min_cosine: float
    batch_size: int

    def __str__(self) -> str:
        return f"max |Δ| {self.max_abs_diff:.2e}, min cosine {self.min_cosine:.7f} (batch {self.batch_size})"


@dataclass(frozen=True)
class OnnxTowerExport(ExportedFile):
    tower: str
    fp16: bool
    agreement: OnnxAgreement | None  # None when the export was not checked

    @property
    def size_bytes(self) -> int:
        """The graph's file plus its external weights file, if it has one."""
        external = self.path.with_name(self.path.name + ".data")
        return self.path.stat().st_size + (external.stat().st_size if external.is_file() else 0)


class _TowerGraph(nn.Module):
    """One tower with float32 inputs/outputs around a tower of any precision, and the L2 normalisation."""

    def __init__(self, encoder: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.encoder = encoder
        self.dtype = dtype

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.is_floating_point():  # images; token ids stay int64
            x = x.to(self.dtype)
        features = self.encoder(x).float()  # (B, embed_dim)
        return F.normalize(features, dim=-1), features


def _encoder(model: CLIP, tower: str) -> nn.Module:
    if tower not in TOWERS:
        raise ExportError(f"unknown tower {tower!r}; towers are {', '.join(TOWERS)}")
    return model.visual if tower == "image" else model.text


def tower_graph(model: CLIP, tower: str, *, fp16: bool = False) -> nn.Module:
    """A CPU copy of one tower, in eval mode, as it is exported (the model itself is left untouched)."""
    dtype = torch.float16 if fp16 else torch.float32
    encoder = copy.deepcopy(_encoder(model, tower)).to(device="cpu", dtype=dtype)
    return _TowerGraph(encoder, dtype).eval()


def example_inputs(model: CLIP, tower: str, batch_size: int, *, seed: int = 0) -> Tensor:
    """Random inputs of a tower's shape: standard-normal images, or rows of random token ids ending in the
    end-of-text token at a random position (zero padding after it, as the tokenizer writes)."""
    _encoder(model, tower)  # validates the name
    generator = torch.Generator().manual_seed(seed)
    if tower == "image":
        size = model.image_size
        return torch.randn(batch_size, 3, size, size, generator=generator)
    cfg = model.config.text
    length = cfg.context_length
    tokens = torch.randint(0, cfg.vocab_size - 1, (batch_size, length), generator=generator)
    tokens += (tokens >= cfg.eot_token_id).long()  # every id but end-of-text
    ends = torch.randint(1, length, (batch_size,), generator=generator)  # (B,)
    positions = torch.arange(length).expand(batch_size, -1)  # (B, L)
    tokens[positions > ends[:, None]] = 0
    tokens[positions == ends[:, None]] = cfg.eot_token_id
    return tokens


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The exporter logs a warning for every torchvision operator it cannot register (we never use them),
    # and torch.export warns about its own deprecated pytree API; neither concerns the caller.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            yield
    finally:
        logger.setLevel(level)


def export_tower_onnx(model: CLIP, tower: str, path: str | Path, *, fp16: bool = False) -> Path:
    """Write one tower ("image" or "text") as an ONNX graph with a dynamic batch axis; returns the path.
    Towers whose weights exceed ~1.8 GB put them in `<path>.data` beside the graph."""
    try:
        import onnxscript  # noqa: F401  (the exporter needs it; fail here with an actionable message)
    except ImportError as exc:
        raise ExportError(
            "ONNX export needs the onnx, onnxscript and onnxruntime packages: "
            "pip install 'clip_train[export]'"
        ) from exc
    path = Path(path)
    graph = tower_graph(model, tower, fp16=fp16)
    input_name, output_names = _IO_NAMES[tower]
    weight_bytes = sum(p.numel() * p.element_size() for p in graph.parameters())
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(
            graph,
            (example_inputs(model, tower, _EXPORT_BATCH),),
            str(path),
            dynamo=True,
            input_names=[input_name],
            output_names=list(output_names),
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=weight_bytes > _EXTERNAL_DATA_BYTES,
            verbose=False,
        )
    return path


def check_onnx_tower(
    model: CLIP, tower: str, path: str | Path, *, fp16: bool = False, batch_size: int = _CHECK_BATCH
) -> OnnxAgreement:
    """Run the ONNX graph at `path` in onnxruntime (CPU) and compare its embeddings with the float32
    PyTorch model's on random inputs. Raises `ExportError` when an fp32 graph differs by more than
    `FP32_MAX_ABS_DIFF` in any component, or an fp16 graph's cosine similarity falls below
    `FP16_MIN_COSINE` for any row."""
    import onnxruntime as ort

    inputs = example_inputs(model, tower, batch_size, seed=1)
    input_name, output_names = _IO_NAMES[tower]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run([output_names[0]], {input_name: inputs.numpy()})[0])
    with torch.no_grad():
        expected, _ = tower_graph(model, tower)(inputs)
    if got.shape != expected.shape or got.dtype != torch.float32:
        raise ExportError(
            f"{path}: onnxruntime returned {got.dtype} {tuple(got.shape)}, expected float32 "
            f"{tuple(expected.shape)}"
        )
    agreement = OnnxAgreement(
        max_abs_diff=float((got - expected).abs().max()),
        min_cosine=float(F.cosine_similarity(got, expected, dim=-1).min()),
        batch_size=batch_size,
    )
    if fp16 and agreement.min_cosine < FP16_MIN_COSINE:
        raise ExportError(
            f"{path}: the fp16 {tower} tower disagrees with PyTorch: cosine {agreement.min_cosine:.6f} < "
            f"{FP16_MIN_COSINE}"
        )
    if not fp16 and agreement.max_abs_diff > FP32_MAX_ABS_DIFF:
        raise ExportError(
            f"{path}: the fp32 {tower} tower disagrees with PyTorch: max |Δ| {agreement.max_abs_diff:.3g} > "
            f"{FP32_MAX_ABS_DIFF}"
        )
    return agreement


def onnx_file_name(tower: str, *, fp16: bool = False) -> str:
    return f"{tower}_tower{'_fp16' if fp16 else ''}.onnx"


def export_onnx(
    model: CLIP,
    out_dir: str | Path,
    *,
    fp16: bool = False,
    towers: Sequence[str] = TOWERS,
    check: bool = True,
) -> list[OnnxTowerExport]:
    """Export the towers to `out_dir` (which must exist) as `image_tower[_fp16].onnx` and
    `text_tower[_fp16].onnx`, each checked against PyTorch in onnxruntime unless `check=False`."""
    out = Path(out_dir)
    unknown = [t for t in towers if t not in TOWERS]
    if unknown or not towers:
        raise ExportError(f"towers must be a non-empty selection of {', '.join(TOWERS)}, got {list(towers)}")
    results = []
    for tower in towers:
        path = export_tower_onnx(model, tower, out / onnx_file_name(tower, fp16=fp16), fp16=fp16)
        agreement = check_onnx_tower(model, tower, path, fp16=fp16) if check else None
        precision = "fp16" if fp16 else "fp32"
        results.append(OnnxTowerExport(path, f"{tower} tower, ONNX {precision}", tower, fp16, agreement))
    return results


def onnx_metadata(
    model: CLIP, tokenizer: Tokenizer, *, fp16: bool = False, towers: Sequence[str] = TOWERS
) -> dict:
    """onnx_config.json: for each tower its graph file, input and outputs; how to turn an image and a text
    into those inputs; and the logit scale (and bias) that turn embedding dot products into logits."""
    size = model.image_size
    config = model.config
    inputs = {
        "image": {"name": "images", "dtype": "float32", "shape": ["batch", 3, size, size]},
        "text": {"name": "tokens", "dtype": "int64", "shape": ["batch", config.text.context_length]},
    }
    record: dict = {
        "format": "clip_train ONNX towers",
        "weights": "fp16" if fp16 else "fp32",  # inputs and outputs are float32 either way
        "embed_dim": config.embed_dim,
        # logits = logit_scale * image_embeds @ text_embeds.T (+ logit_bias): the model's clamped, exp'd scale
        "logit_scale": math.exp(float(model.logit_scale.detach().clamp(max=config.max_logit_scale))),
        "logit_bias": None if model.logit_bias is None else float(model.logit_bias),
    }
    for tower in towers:
        outputs = _IO_NAMES[tower][1]
        record[f"{tower}_tower"] = {
            "file": onnx_file_name(tower, fp16=fp16),
            "input": inputs[tower],
            "outputs": {
                outputs[0]: "float32 (batch, embed_dim), L2-normalised",
                outputs[1]: "float32 (batch, embed_dim), the unnormalised projection",
            },
        }
    record["image_preprocessing"] = {
        "image_size": size,
        "convert": "RGB",
        "resize_shortest_edge": size,
        "resample": "bicubic",
        "center_crop": [size, size],
        "rescale_factor": 1 / 255,
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
        "layout": "NCHW",
    }
    record["tokenizer"] = {
        "vocab_file": "vocab.json",
        "merges_file": "merges.txt",
        "context_length": config.text.context_length,
        "vocab_size": tokenizer.vocab_size,
        "sot_token_id": tokenizer.sot_token_id,
        "eot_token_id": tokenizer.eot_token_id,
        # Whatever follows end-of-text does not change the features (causal attention, pooled at the first
        # end-of-text): 0 as our tokenizer pads, or end-of-text as CLIPTokenizer pads, give the same output.
        "pad_token_id": 0,
        "lowercase": True,
        "truncation": "start, the first context_length - 2 text ids, end-of-text",
    }
    return record


def write_onnx_metadata(
    model: CLIP,
    out_dir: str | Path,
    *,
    fp16: bool = False,
    towers: Sequence[str] = TOWERS,
    tokenizer: Tokenizer | None = None,
) -> list[ExportedFile]:
    """Write onnx_config.json (`onnx_metadata`), the tokenizer files and preprocessor_config.json beside the
    graphs in `out_dir` (see the module docstring). `tokenizer`: the model's (default: the standard BPE
    vocabulary with the model's context length); raises `ExportError` when it does not fit the model."""
    if tokenizer is None:
        tokenizer = Tokenizer(context_length=model.context_length)
    check_tokenizer_fits(model, tokenizer)
    out = Path(out_dir)
    texts = {
        METADATA_FILE: json.dumps(onnx_metadata(model, tokenizer, fp16=fp16, towers=towers), indent=2),
        **huggingface_tokenizer_files(tokenizer, model.context_length),
        "preprocessor_config.json": json.dumps(image_processor_config(model.image_size), indent=2),
    }
    files = []
    for name, text in texts.items():
        (out / name).write_text(text.rstrip("\n") + "\n", encoding="utf-8")
        files.append(ExportedFile(out / name, name.removesuffix(".json").removesuffix(".txt")))
    return files
