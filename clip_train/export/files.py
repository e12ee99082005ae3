"""What every export format shares: its error type, the output folder, and the record of a written file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class ExportError(ValueError):
    """A model or an output folder that an export cannot use; the message names the problem."""


@dataclass(frozen=True)
class ExportedFile:
    """One file an export wrote, with what it holds (e.g. "image tower, fp16")."""

    path: Path
    description: str

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


def check_output_dir(
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    out_name: str | None = None,
    overwrite_name: str | None = None,
) -> Path:
    """Refuse an output path that is a file, or an existing non-empty folder unless `overwrite` (so that an
    export never mixes its files with another's by accident). Creates nothing; returns the path.

    The refusals call the folder "the output folder" and the way out "overwrite=True"; a CLI passes its own
    options' names instead (`out_name="--out"`, `overwrite_name="--overwrite"`), as a keyword argument
    means nothing to its user."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out_name or 'the output path'} {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(
            f"{out_name or 'the output folder'} {out} exists and is not empty; choose a new folder, or pass "
            f"{overwrite_name or 'overwrite=True'} to replace the files of the same names (other files are "
            "left alone)"
        )
    return out


def prepare_output_dir(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """`check_output_dir`, then create the folder (and its parents). With `overwrite`, files of the names
    an export writes are replaced and any others left alone."""
    out = check_output_dir(out_dir, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    return out


def human_size(n_bytes: int) -> str:
    """1536 → "1.5 KB", 13_079_552 → "13.1 MB" (decimal units, as file managers show them)."""
    if n_bytes < 1000:
        return f"{n_bytes} B"
    size = n_bytes / 1000
    for unit in ("KB", "MB"):
        if size < 1000:
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
