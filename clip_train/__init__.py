"""clip_train: CLIP models, tokenizer, losses and the training program."""

__version__ = "0.1.0"
