"""Part 2 of the crawler: download a URL/text table into WebDataset shards (see README.md here).

Public API: `run_download(DownloadConfig(...))`, the configs `FetchConfig` and `ImageConfig`, and the
CLI `python -m data_pipelines.download`.
"""

from data_pipelines.download.fetch import FetchConfig, Fetcher, FetchResult
from data_pipelines.download.images import ImageConfig, ImageRejected, process_image
from data_pipelines.download.plan import InputError, read_input
from data_pipelines.download.runner import DownloadConfig, Summary, run_download

__all__ = [
    "DownloadConfig",
    "FetchConfig",
    "FetchResult",
    "Fetcher",
    "ImageConfig",
    "ImageRejected",
    "InputError",
    "Summary",
    "process_image",
    "read_input",
    "run_download",
]
