"""Class sources from Hugging Face ``datasets``: any Dataset with an input column and a label column.

Works for hub data sets (``load_dataset("omniglot")`` when online) and for local files through the
packaged builders (``"imagefolder"`` with ``data_dir=``, ``"parquet"`` / ``"json"`` with
``data_files=``). Images are decoded once into a uint8 tensor; texts stay strings.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from metaformer.data.images import decode_image, stack_images
from metaformer.data.source import ClassSource, TensorClassSource, TextClassSource
from metaformer.data.text import encode_labels

__all__ = ["hf_class_source", "load_hf_source"]


def _column_kind(dataset: Any, column: str) -> str:
    """'image' or 'text' for an input column, from the data set's declared features."""
    import datasets

    feature = dataset.features[column]
    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return "text"
    raise ValueError(
        f"input column {column!r} has feature type {feature!r}; it must be an Image or a string column "
        "(cast it with dataset.cast_column(column, datasets.Image()) for image paths)"
    )


def _column(dataset: Any, column: str) -> list:
    """A column as a Python list via Arrow (row selections respected; iterating a Column is ~100x slower)."""
    return dataset.with_format("arrow")[column].to_pylist()


def _labels(dataset: Any, column: str) -> tuple[list[int], list[str]]:
    """Class indices and names for a label column (ClassLabel names kept; other values sorted)."""
    import datasets

    feature = dataset.features[column]
    values = _column(dataset, column)
    if isinstance(feature, datasets.ClassLabel):
        if not values:
            raise ValueError("the data set is empty (no rows); check the split or the data files")
        bad = sorted({v for v in values if v is None or not 0 <= v < feature.num_classes})
        if bad:
            raise ValueError(
                f"label column {column!r} holds {bad[:5]} outside its ClassLabel range 0..{feature.num_classes - 1}; "
                "fix the labels or recast the column"
            )
        return list(values), list(feature.names)
    if any(v is None for v in values):
        rows = [i for i, v in enumerate(values) if v is None][:5]
        raise ValueError(f"label column {column!r} has missing labels at rows {rows}; fill or filter them first")
    return encode_labels(values, f"label column {column!r}")


def hf_class_source(
    dataset: Any,
    input_column: str | None = None,
    label_column: str = "label",
    image_size: int | tuple[int, int] | None = None,
    mode: str | None = None,
) -> ClassSource:
    """A class source over a ``datasets.Dataset``: images (decoded once to uint8) or texts, by label.

    ``input_column`` defaults to the only Image or string column besides the label. ``mode``
    ("L" or "RGB") and ``image_size`` apply to images; default mode: "L" when the first image is
    grayscale, else "RGB".
    """
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(
            f"got a DatasetDict with splits {sorted(dataset)}; pass one split, e.g. dataset['train']"
        )
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"expected a datasets.Dataset, got {type(dataset).__name__}")
    columns = list(dataset.column_names)
    if label_column not in columns:
        raise ValueError(f"label column {label_column!r} does not exist; columns are {columns}: pass label_column=...")
    if input_column is None:
        candidates = [c for c in columns if c != label_column and _safe_kind(dataset, c)]
        if len(candidates) != 1:
            raise ValueError(
                f"cannot guess the input column among {columns} (candidates: {candidates}); pass input_column=..."
            )
        input_column = candidates[0]
    if input_column not in columns:
        raise ValueError(f"input column {input_column!r} does not exist; columns are {columns}: pass input_column=...")
    if len(dataset) == 0:
        raise ValueError("the data set is empty (no rows); check the split, data_dir or data_files")
    kind = _column_kind(dataset, input_column)
    labels, names = _labels(dataset, label_column)
    desc = f"HF dataset {getattr(dataset.info, 'dataset_name', None) or ''}[{input_column}]".strip()
    if kind == "text":
        texts = _column(dataset, input_column)
        missing = [i for i, t in enumerate(texts) if t is None][:5]
        if missing:
            raise ValueError(f"input column {input_column!r} has missing texts at rows {missing}; fill or filter them")
        return TextClassSource(texts, labels, names, name=desc)
    raw = _column(dataset.cast_column(input_column, datasets.Image(decode=False)), input_column)
    arrays, where = [], []
    for i, item in enumerate(raw):
        if item is None:
            raise ValueError(f"row {i} of column {input_column!r} has no image; fill or filter it first")
        what = item.get("path") or f"row {i} of column {input_column!r}"
        data = item.get("bytes") or item.get("path")
        if data is None:
            raise ValueError(f"{what}: neither image bytes nor a path; fix the data set")
        if mode is None:
            decode_image(data, what, "RGB", None)  # raises an error naming the file if unreadable
            mode = "L" if _is_gray(data) else "RGB"
        arrays.append(decode_image(data, what, mode, image_size))
        where.append(what)
    items = stack_images(arrays, where, image_size)
    return TensorClassSource(items, torch.tensor(labels), names, name=desc)


def _is_gray(data: bytes | str) -> bool:
    """True when an (already readable) image is stored as grayscale or 1-bit."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        return img.mode in ("1", "L", "LA", "I", "I;16", "F")


def _safe_kind(dataset: Any, column: str) -> bool:
    """Whether a column could be an input column (Image or string)."""
    try:
        _column_kind(dataset, column)
        return True
    except ValueError:
        return False


def load_hf_source(
    path: str,
    input_column: str | None = None,
    label_column: str = "label",
    split: str = "train",
    image_size: int | tuple[int, int] | None = None,
    mode: str | None = None,
    **load_kwargs: Any,
) -> ClassSource:
    """``datasets.load_dataset(path, split=split, **load_kwargs)`` as a class source (hub name or local builder)."""
    import datasets

    data_dir = load_kwargs.get("data_dir")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir {data_dir} does not exist; pass the folder that holds the data files")
    from datasets.data_files import EmptyDatasetError

    try:
        dataset = datasets.load_dataset(path, split=split, **load_kwargs)
    except EmptyDatasetError as err:
        raise ValueError(f"load_dataset({path!r}) found an empty data set ({err}); check data_dir / data_files") from None
    except ValueError as err:
        if "split" in str(err).lower():
            raise ValueError(f"load_dataset({path!r}) has no split {split!r} ({err}); pass split=...") from None
        raise
    return hf_class_source(dataset, input_column, label_column, image_size, mode)
