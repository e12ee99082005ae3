"""`python -m clip_train.export --help`; see clip_train/export/cli.py."""

from clip_train.evaluation.cli_common import run
from clip_train.export.cli import main

if __name__ == "__main__":
    run(main)
