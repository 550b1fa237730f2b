"""Images in the ImageFolder layout: ``root/<class name>/**/<image>``."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from datamodules.errors import UserError
from datamodules.sources.base import Pool, SourceData

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)


def load_rgb(path: str | Path, *, min_short_side: int | None = None):
    """Open an image as RGB, honouring its EXIF orientation.

    Grey, palette (transparency over black), RGBA, CMYK and 16-bit images become 8-bit RGB. A
    truncated file is loaded with its missing part left grey (it passed the header check at scan
    time; see :func:`check_images`).

    ``min_short_side``: a JPEG is decoded at the smallest of 1/8, 1/4, 1/2 or full scale whose
    short side keeps at least that many pixels (DCT scaling in the decoder, Pillow's ``draft``):
    a 4032x3024 photo for a 224-px eval view decodes at 504x378, many times faster, and is then
    resized as before. Other formats are decoded whole.
    """
    from PIL import Image, ImageFile, ImageOps

    ImageFile.LOAD_TRUNCATED_IMAGES = True
    with Image.open(path) as img:
        if min_short_side and img.format == "JPEG":
            w, h = img.size
            scale = min_short_side / min(w, h)
            if scale < 0.5:  # draft never goes below the requested size
                img.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grey: scale to 8 bits
            arr = np.asarray(img, dtype=np.float32)
            top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
            img = Image.fromarray((np.clip(arr / top, 0, 1) * 255).round().astype(np.uint8))
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, img)
        return img.convert("RGB")


def list_images(folder: Path) -> list[Path]:
    """Image files below ``folder`` (any depth), sorted for a stable order; hidden files skipped."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _warn_ignored(root: Path, classes: list[str], skipped: list[Path]) -> None:
    """One warning each for hidden folders, non-image files and unreadable images of ``root``."""
    hidden = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("."))
    if hidden:
        log.warning(
            "Ignored %d hidden folder(s) in '%s' (names starting with '.'): %s; rename them to "
            "use them as classes.",
            len(hidden),
            root,
            ", ".join(hidden[:10]),
        )
    others = [p for name in classes for p in _other_files(root / name)]
    if others:
        log.warning(
            "Ignored %d file(s) in '%s' that are not images (%s): %s%s",
            len(others),
            root,
            ", ".join(IMAGE_EXTENSIONS),
            ", ".join(str(p.relative_to(root)) for p in others[:10]),
            f" and {len(others) - 10} more" if len(others) > 10 else "",
        )
    if skipped:
        shown = ", ".join(str(p.relative_to(root)) for p in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        log.warning(
            "Skipped %d unreadable file(s) in '%s' (empty, not an image or corrupt): %s%s",
            len(skipped),
            root,
            shown,
            more,
        )


def _other_files(folder: Path) -> list[Path]:
    """Files below ``folder`` that :func:`list_images` leaves out for their extension."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() not in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def check_images(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """Split ``paths`` into readable images and unreadable files (empty, not an image, corrupt).

    Only the header is parsed (fast); the pixels are decoded when the image is used.
    """
    from PIL import Image, UnidentifiedImageError

    good, bad = [], []
    for path in paths:
        try:
            if path.stat().st_size == 0:
                raise OSError("empty file")
            with Image.open(path) as img:
                img.size  # noqa: B018 - parsing the header is the check
            good.append(path)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            bad.append(path)
    return good, bad


def scan_class_folder(root: str | Path, *, class_names: list[str] | None = None):
    """Return (class names, image paths, targets) of an ImageFolder-style tree.

    With ``class_names`` given (the training set's), the folder must hold the same classes.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(
            f"Image folder '{root}' does not exist: set data.root to a folder with one "
            "sub-folder per class (root/cat/*.jpg, root/dog/*.jpg)."
        )
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise UserError(
            f"Image folder '{root}' has no class sub-folders: put each class's images in "
            "its own sub-folder (root/cat/*.jpg, root/dog/*.jpg)."
        )
    if class_names is not None and found != class_names:
        raise UserError(
            f"'{root}' has classes {found} but the training folder has {class_names}: "
            "use the same class sub-folders in every split."
        )
    paths, targets, skipped = [], [], []
    for index, name in enumerate(found):
        files, bad = check_images(list_images(root / name))
        skipped += bad
        if not files:
            raise UserError(
                f"Class folder '{root / name}' holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
                "add images or remove the folder."
            )
        paths += files
        targets += [index] * len(files)
    _warn_ignored(root, found, skipped)
    if class_names is None and len(found) < 2:
        raise UserError(
            f"Image folder '{root}' has a single class ('{found[0]}'): a classifier needs at "
            "least two class sub-folders."
        )
    return found, paths, np.asarray(targets, dtype=np.int64)


class FileLoader:
    """``loader(i)`` opens the i-th path as RGB (a picklable callable, for any worker start method);
    ``loader(i, min_short_side=n)`` decodes a JPEG only as large as needed (:func:`load_rgb`)."""

    sized = True  # takes min_short_side (datamodules.image_datamodule.SplitDataset)

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __call__(self, index: int, *, min_short_side: int | None = None):
        return load_rgb(self.paths[index], min_short_side=min_short_side)

    def stamp(self, indices) -> str:
        """A digest of the files at ``indices``, in order: path, size, modification and change
        times. Whatever reuses pixels decoded from them (decoded-image and feature caches)
        keys on it: a file replaced under the same name changes it (ctime too: a copy that keeps
        size and mtime, ``cp -p``, still changes it)."""
        import hashlib
        import os

        digest = hashlib.sha256()
        for index in indices:
            path = os.path.abspath(self.paths[int(index)])
            st = os.stat(path)
            digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
        return digest.hexdigest()


class ImageFolderSource:
    """Your own images, one sub-folder per class; optional separate validation and test folders.

    Ids are the paths relative to their split's folder (``"cat/001.jpg"``), prefixed by the split
    for separate folders (``"val:cat/001.jpg"``).
    """

    def __init__(
        self,
        *,
        root: str,
        val_root: str | None = None,
        test_root: str | None = None,
    ) -> None:
        self.root, self.val_root, self.test_root = root, val_root, test_root

    def _pool(self, root: str, class_names: list[str] | None, prefix: str) -> tuple[list, Pool]:
        names, paths, targets = scan_class_folder(root, class_names=class_names)
        ids = [prefix + p.relative_to(Path(root).expanduser()).as_posix() for p in paths]
        return names, Pool(load=FileLoader(paths), targets=targets, ids=ids)

    def load(self) -> SourceData:
        names, train = self._pool(self.root, None, "")
        val = self._pool(self.val_root, names, "val:")[1] if self.val_root else None
        test = self._pool(self.test_root, names, "test:")[1] if self.test_root else None
        return SourceData(class_names=names, train=train, val=val, test=test)
