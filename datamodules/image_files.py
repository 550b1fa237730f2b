"""A folder of image files to run a trained model on (``task=predict``, ``visualize.images``).

:func:`image_files` lists them (any depth, sorted, hidden files skipped) and refuses a path that
is not a folder of images; :class:`ImageFiles` loads them as the model's input, and
:func:`folder_targets` reads labels from first-level sub-folders named like classes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from datamodules.errors import UserError
from datamodules.sources.folder import IMAGE_EXTENSIONS, list_images, load_rgb

log = logging.getLogger(__name__)


def image_files(folder, *, option: str) -> tuple[Path, list[Path]]:
    """``(folder, its image files)``; a :class:`UserError` naming ``option`` when the path is not
    a folder or holds no images."""
    if not folder or not Path(str(folder)).expanduser().is_dir():
        raise UserError(
            f"{option}={folder!r} is not a folder: give a folder of images, e.g. "
            f"{option}=~/new_photos."
        )
    root = Path(str(folder)).expanduser()
    paths = list_images(root)
    if not paths:
        raise UserError(
            f"No images in '{root}' ({', '.join(IMAGE_EXTENSIONS)}): point {option} at a folder "
            "that holds some (sub-folders are searched too)."
        )
    return root, paths


def folder_targets(root: Path, paths: Sequence[Path], class_names: Sequence[str]) -> list[int]:
    """Per file, the index of the class its first-level sub-folder is named after, else -1."""
    index = {str(name): i for i, name in enumerate(class_names)}
    rel = [p.relative_to(root) for p in paths]
    return [index.get(r.parts[0], -1) if len(r.parts) > 1 else -1 for r in rel]


class ImageFiles(Dataset):
    """Images by path: item ``i`` is ``(transformed image, readable, i)``.

    ``min_short_side``: see :func:`~datamodules.sources.folder.load_rgb`. With ``blank_size``,
    an unreadable file gives the transform of a blank image of that size and
    ``readable=False`` instead of stopping (predictions report it); without, it is refused with
    a :class:`UserError` naming the file.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        transform,
        *,
        blank_size: int | None = None,
        min_short_side: int | None = None,
    ):
        self.paths, self.transform, self.blank_size = list(paths), transform, blank_size
        self.min_short_side = min_short_side  # JPEGs decoded only as large as needed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = load_rgb(self.paths[i], min_short_side=self.min_short_side)
            return self.transform(image), True, i
        except Exception as err:  # a corrupt or non-image file
            if self.blank_size is None:
                raise UserError(
                    f"Cannot read '{self.paths[i]}' ({type(err).__name__}): remove or replace it."
                ) from err
            from PIL import Image

            log.debug("Cannot read %s: %s", self.paths[i], err)
            return self.transform(Image.new("RGB", (self.blank_size,) * 2)), False, i

    def image(self, i: int):
        """The transformed image ``i`` alone."""
        return self[i][0]
