"""CLIP training data: WebDataset shards -> decoded, augmented, tokenised batches."""

from clip_train.data.shards import ShardError, expand_urls
from clip_train.data.webdataset_module import WebDatasetDataModule

__all__ = ["ShardError", "WebDatasetDataModule", "expand_urls"]
