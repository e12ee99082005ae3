"""data_pipelines: the query-balanced crawler that turns web pairs into WebDataset shards."""

__version__ = "0.1.0"
