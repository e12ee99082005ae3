"""`python -m clip_train` trains a CLIP model; see clip_train/train.py and configs/train.yaml."""

from clip_train.train import main

if __name__ == "__main__":
    main()
