"""Image decoding shared by every image source, image-folder classes and Lake's one-shot runs.

Every decoder returns uint8 arrays (compact; the sources scale to [0, 1] floats per episode) and
names the offending file when an image cannot be read.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from metaformer.data.episodes import Episode
from metaformer.data.source import TensorClassSource

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "decode_image",
    "decode_stroke_image",
    "image_folder_source",
    "lake_runs",
    "stack_images",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_MODES = {"L": 1, "RGB": 3}


def _pil() -> ModuleType:
    """PIL's Image module, imported on first use: ``import metaformer`` stays ~2 MiB lighter without images."""
    from PIL import Image

    return Image


def _open(data: bytes | str | os.PathLike, what: str) -> Image.Image:
    """Open and fully load an image, raising a ValueError that names ``what`` when it is unreadable."""
    Image = _pil()  # noqa: N806
    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        img.load()
        return img
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(
            f"cannot read image {what}: {err}; replace or remove the corrupt file and try again"
        ) from None


def decode_image(
    data: bytes | str | os.PathLike,
    what: str,
    mode: str = "RGB",
    image_size: int | tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode one image to a uint8 [C, H, W] array in ``mode`` ("L" or "RGB"), optionally resized."""
    if mode not in _MODES:
        raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
    img = _open(data, what).convert(mode)
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else (image_size[1], image_size[0])
        if img.size != size:
            img = img.resize(size, _pil().Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def decode_stroke_image(data: bytes | str | os.PathLike, what: str, image_size: int = 28) -> np.ndarray:
    """Decode a black-on-white drawing (Omniglot) to uint8 [1, S, S] with strokes = 255 (i.e. 1.0)."""
    img = _open(data, what).convert("L")
    # Invert before resizing so the antialiased stroke edges average stroke intensity, not paper.
    Image = _pil()  # noqa: N806
    img = Image.fromarray(255 - np.asarray(img, dtype=np.uint8))
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)[None]


def _infer_mode(path: Path) -> str:
    """'L' for grayscale / 1-bit images, 'RGB' otherwise."""
    with _pil().open(path) as img:
        return "L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"


def stack_images(arrays: Sequence[np.ndarray], names: Sequence[str], image_size: object) -> torch.Tensor:
    """Stack uint8 [C, H, W] arrays, with a clear error naming the first image of a different shape."""
    shape = arrays[0].shape
    for arr, name in zip(arrays, names):
        if arr.shape != shape:
            raise ValueError(
                f"image {name} has shape {arr.shape} but {names[0]} has {shape}; pass image_size=... "
                f"(currently {image_size!r}) to resize every image to one size"
            )
    return torch.from_numpy(np.stack(arrays))


def image_folder_source(
    root: str | os.PathLike,
    image_size: int | tuple[int, int] | None = None,
    mode: str | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> TensorClassSource:
    """Classes from an image folder (one subfolder per class, sorted by name), decoded once into uint8.

    ``mode`` "L" (1 channel) or "RGB" (3 channels); default: inferred from the first image. Files
    whose extension is not an image extension raise an error (nothing is silently skipped), except
    hidden files such as ``.DS_Store``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; pass the directory that holds one subfolder per class")
    exts = tuple(e.lower() for e in extensions)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    stray = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if stray:
        raise ValueError(
            f"image folder {root} has files outside class subfolders ({', '.join(stray[:5])}); "
            "move each image into a subfolder named after its class"
        )
    if not class_dirs:
        raise ValueError(f"image folder {root} is empty (no class subfolders); put each class's images in root/<class>/")
    files: list[Path] = []
    labels: list[int] = []
    for c, d in enumerate(class_dirs):
        found = sorted(p for p in d.iterdir() if not p.name.startswith("."))
        if not found:
            raise ValueError(f"class folder {d} has no images; add images or remove the folder")
        for p in found:
            if not p.is_file() or p.suffix.lower() not in exts:
                raise ValueError(
                    f"{p} is not an image file (extensions {', '.join(exts)}); move it out of {root} "
                    "or pass extensions=... to accept it"
                )
            files.append(p)
            labels.append(c)
    if mode is None:
        try:
            mode = _infer_mode(files[0])
        except (_pil().UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {files[0]}: {err}; replace or remove the corrupt file") from None
    arrays = [decode_image(p, str(p), mode, image_size) for p in files]
    items = stack_images(arrays, [str(p) for p in files], image_size)
    return TensorClassSource(
        items, torch.tensor(labels), [d.name for d in class_dirs], name=f"image folder {root}"
    )


def _to_unit_float(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """Stack uint8 images into a float32 tensor in [0, 1]."""
    return torch.from_numpy(np.stack(arrays)).to(torch.float32).div_(255.0)


_LABEL_LINE = re.compile(r"^\s*(\S+)\s+(\S+)\s*$")


def lake_runs(root: str | os.PathLike, image_size: int = 28) -> list[Episode]:
    """Lake et al.'s one-shot classification runs (``runNN/``) as a fixed list of 20-way 1-shot episodes.

    Each run folder holds ``training/classNN.png`` (one drawing per class: the support set),
    ``test/itemNN.png`` (the queries) and ``class_labels.txt`` pairing each test item with its
    training class (``runNN/test/itemNN.png runNN/training/classMM.png`` per line). Images are
    preprocessed like Omniglot (strokes = 1, ``image_size`` square).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Lake runs directory {root} does not exist; pass the folder holding run01/, run02/, ...")
    runs = sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"run\d+", p.name))
    if not runs:
        raise ValueError(f"{root} holds no runNN/ folders; pass the folder of Lake's one-shot runs")
    episodes = []
    for run in runs:
        label_file = run / "class_labels.txt"
        if not label_file.is_file():
            raise FileNotFoundError(f"{label_file} is missing; each run folder needs its class_labels.txt")
        train_files = sorted((run / "training").glob("*.png")) if (run / "training").is_dir() else []
        if not train_files:
            raise ValueError(f"{run / 'training'} has no class images; each run needs training/classNN.png")
        class_index = {p.name: i for i, p in enumerate(train_files)}
        pairs = []
        for n, line in enumerate(label_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            m = _LABEL_LINE.match(line)
            if m is None:
                raise ValueError(f"{label_file}:{n}: expected 'test_image training_image', got {line!r}")
            test_name, train_name = Path(m.group(1)).name, Path(m.group(2)).name
            if train_name not in class_index:
                raise ValueError(f"{label_file}:{n}: training image {m.group(2)} not found in {run / 'training'}")
            test_path = run / "test" / test_name
            if not test_path.is_file():
                raise FileNotFoundError(f"{label_file}:{n}: test image {test_path} is missing")
            pairs.append((test_path, class_index[train_name]))
        if not pairs:
            raise ValueError(f"{label_file} pairs no test items with classes; it must have one line per test item")
        support = [decode_stroke_image(p, str(p), image_size) for p in train_files]
        query = [decode_stroke_image(p, str(p), image_size) for p, _ in pairs]
        episodes.append(
            Episode(
                _to_unit_float(support),
                torch.arange(len(train_files)),
                _to_unit_float(query),
                torch.tensor([c for _, c in pairs], dtype=torch.int64),
                [f"{run.name}/{p.stem}" for p in train_files],
            )
        )
    return episodes
