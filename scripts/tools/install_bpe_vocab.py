"""Install the standard CLIP BPE merges file from the package registry.

The 49,408-token vocabulary that every released CLIP model uses is published (MIT licence) in OpenAI's CLIP
release and redistributed inside the `open_clip_torch` wheel on PyPI. We download that wheel without its
dependencies, take the one file out of it and check its SHA-256, so the tokenizer works offline afterwards.
Nothing is fetched at run time.

    python scripts/tools/install_bpe_vocab.py --out clip_train/assets/bpe_simple_vocab_16e6.txt.gz
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
WHEEL_SPEC = "open_clip_torch==3.3.0"
MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write the .txt.gz merges file")
    parser.add_argument(
        "--wheel-spec", default=WHEEL_SPEC, help="pip requirement of the wheel to take it from"
    )
    args = parser.parse_args()

    if args.out.exists() and sha256(args.out.read_bytes()) == SHA256:
        print(f"BPE vocabulary already in place: {args.out}")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        print(f"downloading {args.wheel_spec} (no dependencies) to extract {MEMBER}")
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "-d", tmp, args.wheel_spec]  # fmt: skip
        if subprocess.run(cmd).returncode != 0:
            print(
                "error: pip could not download the wheel; check access to the package index", file=sys.stderr
            )
            return 1
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            print(f"error: expected one wheel in {tmp}, found {wheels}", file=sys.stderr)
            return 1
        with zipfile.ZipFile(wheels[0]) as zf:
            data = zf.read(MEMBER)

    if sha256(data) != SHA256:
        print(f"error: {MEMBER} has SHA-256 {sha256(data)}, expected {SHA256}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".partial")
    tmp_out.write_bytes(data)
    tmp_out.replace(args.out)
    print(f"BPE vocabulary written: {args.out} ({len(data):,} bytes, SHA-256 verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
