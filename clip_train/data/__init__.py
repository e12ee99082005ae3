"""CLIP training data: WebDataset shards -> decoded, augmented, tokenised batches."""

from clip_train.data.shards import ShardError, expand_urls

__all__ = ["ShardError", "WebDatasetDataModule", "expand_urls"]


def __getattr__(name: str):
    # The data module pulls in pytorch_lightning (seconds to import); evaluation CLIs that only need the
    # transforms or shard helpers should not pay for it.
    if name == "WebDatasetDataModule":
        from clip_train.data.webdataset_module import WebDatasetDataModule

        return WebDatasetDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
