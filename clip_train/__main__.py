"""`python -m clip_train` trains a CLIP model; see clip_train/train.py and configs/train.yaml."""

import sys

from clip_train.train import check_command_line, main

if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
