"""Data sources: each turns some storage of labelled images into :class:`SourceData`."""

from datamodules.sources.base import Pool, SourceData
from datamodules.sources.digits import DigitsSource
from datamodules.sources.folder import ImageFolderSource
from datamodules.sources.torchvision_sets import TorchvisionSource

__all__ = ["DigitsSource", "ImageFolderSource", "Pool", "SourceData", "TorchvisionSource"]
