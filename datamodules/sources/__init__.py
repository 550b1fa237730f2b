"""Data sources: each turns some storage of labelled images into :class:`SourceData`."""

from datamodules.sources.base import Pool, SourceData
from datamodules.sources.csv_table import CsvSource
from datamodules.sources.digits import DigitsSource
from datamodules.sources.folder import ImageFolderSource
from datamodules.sources.synthetic_tasks import SyntheticTasksSource
from datamodules.sources.torchvision_sets import TorchvisionSource

__all__ = [
    "CsvSource",
    "DigitsSource",
    "ImageFolderSource",
    "Pool",
    "SourceData",
    "SyntheticTasksSource",
    "TorchvisionSource",
]
