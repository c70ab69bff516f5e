"""Omniglot from its official zip files: decode once, cache a compact uint8 array, split by alphabet.

Layout of each zip: ``images_<set>/<Alphabet>/characterNN/XXXX_YY.png`` (105x105, black strokes on
white). Preprocessing is the standard one: invert so strokes are 1, resize to 28x28, and optionally
add rotations by 90/180/270 degrees as new classes. Classes are named ``Alphabet/characterNN``
(``.../rotDDD`` with rotations), their group is the alphabet.

The decoded array lives in a cache directory (``$METAFORMER_CACHE``, else
``$XDG_CACHE_HOME/metaformer``, else ``~/.cache/metaformer``), keyed by the zip's name, size,
modification time and a hash of its first and last bytes, so the data directory may be read-only
and a changed zip is decoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from metaformer.data.images import decode_stroke_image
from metaformer.data.source import ClassSource, ClassSubset, TensorClassSource, split_by_group, with_rotations

__all__ = [
    "OMNIGLOT_SETS",
    "OMNIGLOT_URL",
    "default_cache_dir",
    "resolve_data_root",
    "find_omniglot_dir",
    "load_omniglot",
    "omniglot_alphabet_split",
    "omniglot_vinyals_split",
    "read_split_file",
]

OMNIGLOT_SETS = ("background", "evaluation", "background_small1", "background_small2")
OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{name}"
_CACHE_VERSION = 1
_DATA_ROOT_HINT = (
    "pass --data-root DIR (or set METAFORMER_DATA_ROOT) to the folder holding omniglot/images_*.zip"
)


def default_cache_dir() -> Path:
    """The user cache directory: $METAFORMER_CACHE, $XDG_CACHE_HOME/metaformer or ~/.cache/metaformer."""
    env = os.environ.get("METAFORMER_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "metaformer"


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """``data_root``, else $METAFORMER_DATA_ROOT; a clear error naming --data-root when neither is set."""
    if data_root is None:
        data_root = os.environ.get("METAFORMER_DATA_ROOT")
    if data_root is None:
        raise FileNotFoundError(f"no data directory given; {_DATA_ROOT_HINT}")
    return Path(data_root)


def find_omniglot_dir(data_root: str | os.PathLike | None = None) -> Path:
    """The Omniglot folder: ``data_root/omniglot`` when it exists, else ``data_root`` itself."""
    root = resolve_data_root(data_root)
    return root / "omniglot" if (root / "omniglot").is_dir() else root


def _zip_name(image_set: str) -> str:
    """'background' -> 'images_background.zip'."""
    if image_set not in OMNIGLOT_SETS:
        raise ValueError(f"unknown Omniglot set {image_set!r}; choose from {', '.join(OMNIGLOT_SETS)}")
    return f"images_{image_set}.zip"


def _download(name: str, target_dir: Path, url_template: str) -> Path:
    """Download one official zip into ``target_dir`` (atomically); raise a clear error when offline."""
    url = url_template.format(name=name)
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target_dir, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:
            shutil.copyfileobj(resp, out)
        zipfile.ZipFile(tmp).close()  # a truncated download is not a zip: fail here, not later
        dest = target_dir / name
        os.replace(tmp, dest)
        return dest
    except (urllib.error.URLError, OSError, zipfile.BadZipFile, ValueError) as err:
        Path(tmp).unlink(missing_ok=True)
        raise FileNotFoundError(
            f"Omniglot zip {name} is not in {target_dir} and downloading it from {url} failed ({err}); "
            f"download it by hand into that folder, or {_DATA_ROOT_HINT}"
        ) from None


def zip_candidates(image_set: str, omniglot_dir: Path, cache_dir: Optional[Path] = None) -> tuple[Path, Path]:
    """Where the loader looks for ``image_set``'s zip, in order: the data dir, then the download cache."""
    name = _zip_name(image_set)
    return omniglot_dir / name, (default_cache_dir() if cache_dir is None else cache_dir) / "downloads" / name


def _locate_zip(image_set: str, omniglot_dir: Path, download: bool, cache_dir: Path, url: str) -> Path:
    """Path of the zip for ``image_set``: in the data dir, in the cache, or freshly downloaded."""
    name = _zip_name(image_set)
    for candidate in zip_candidates(image_set, omniglot_dir, cache_dir):
        if candidate.is_file():
            return candidate
    if not download:
        raise FileNotFoundError(
            f"Omniglot zip {name} not found in {omniglot_dir}; {_DATA_ROOT_HINT} (from Python, download=True "
            "fetches it where there is internet)"
        )
    writable = omniglot_dir.is_dir() and os.access(omniglot_dir, os.W_OK)
    return _download(name, omniglot_dir if writable else cache_dir / "downloads", url)


def _cache_key(zip_path: Path, image_size: int) -> str:
    """Key of a decoded zip: name, size, mtime and a hash of its first and last 64 KiB."""
    st = zip_path.stat()
    h = hashlib.sha256(f"{_CACHE_VERSION}|{zip_path.name}|{st.st_size}|{st.st_mtime_ns}|{image_size}".encode())
    with open(zip_path, "rb") as f:
        h.update(f.read(1 << 16))
        f.seek(max(0, st.st_size - (1 << 16)))
        h.update(f.read())
    return h.hexdigest()[:24]


def _decode_zip(zip_path: Path, image_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode every drawing: uint8 images [M, 1, S, S], labels [M], class names 'Alphabet/characterNN'."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"cannot open Omniglot zip {zip_path}: {err}; delete it and download it again") from None
    with zf:
        entries = []
        for info in zf.infolist():
            if info.is_dir():
                continue
            parts = info.filename.split("/")
            if len(parts) != 4 or not parts[3].lower().endswith(".png"):
                raise ValueError(
                    f"unexpected entry {info.filename!r} in {zip_path}; an Omniglot zip holds only "
                    "images_<set>/<Alphabet>/<character>/<drawing>.png (use the official zip)"
                )
            entries.append((parts[1], parts[2], parts[3], info.filename))
        if not entries:
            raise ValueError(f"Omniglot zip {zip_path} holds no images; download the official zip again")
        entries.sort()
        names = sorted({f"{a}/{c}" for a, c, _, _ in entries})
        index = {n: i for i, n in enumerate(names)}
        images = np.empty((len(entries), 1, image_size, image_size), dtype=np.uint8)
        labels = np.empty(len(entries), dtype=np.int64)
        for j, (alpha, char, _, member) in enumerate(entries):
            try:
                raw = zf.read(member)
            except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # a damaged member (bad CRC, truncated data)
                raise ValueError(f"Omniglot zip {zip_path} is damaged ({member}: {err}); delete it and download it "
                                 "again") from None
            images[j] = decode_stroke_image(raw, f"{member} in {zip_path}", image_size)
            labels[j] = index[f"{alpha}/{char}"]
    return images, labels, names


def _load_set(zip_path: Path, image_size: int, cache_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decoded arrays of one zip, from the cache when present (written atomically on first use)."""
    key = _cache_key(zip_path, image_size)
    folder = cache_dir / "omniglot"
    npz = folder / f"{zip_path.stem}-{image_size}px-{key}.npz"
    if npz.is_file():
        try:
            with np.load(npz, allow_pickle=False) as f:
                return f["images"], f["labels"], json.loads(str(f["names"]))
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is simply rebuilt below
    images, labels, names = _decode_zip(zip_path, image_size)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.part")
        with os.fdopen(fd, "wb") as out:
            np.savez(out, images=images, labels=labels, names=np.array(json.dumps(names)))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should be readable by others
        os.replace(tmp, npz)  # atomic: parallel test workers never read a half-written file
    except OSError as err:
        warnings.warn(f"could not write the Omniglot cache in {folder} ({err}); set METAFORMER_CACHE to a writable dir")
    return images, labels, names


def load_omniglot(
    data_root: str | os.PathLike | None = None,
    sets: Sequence[str] = ("background",),
    image_size: int = 28,
    rotations: bool = False,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    url: str = OMNIGLOT_URL,
) -> ClassSource:
    """Omniglot classes from the official zips in ``data_root`` (or ``data_root/omniglot``).

    ``sets``: any of "background", "evaluation", "background_small1", "background_small2".
    Images are 1 x image_size x image_size, strokes = 1. ``rotations=True`` adds the 90/180/270
    degree rotations as new classes (4x the classes, named ``Alphabet/characterNN/rotDDD``).
    Missing zips are downloaded from ``url`` when ``download`` (into the data folder when it is
    writable, else the cache); failures raise an error naming --data-root.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if isinstance(sets, str):
        sets = (sets,)
    if not sets:
        raise ValueError("sets is empty; pass e.g. sets=('background',)")
    omniglot_dir = find_omniglot_dir(data_root)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    all_images, all_labels, all_names = [], [], []
    for image_set in sets:
        zip_path = _locate_zip(image_set, omniglot_dir, download, cache, url)
        images, labels, names = _load_set(zip_path, image_size, cache)
        all_images.append(images)
        all_labels.append(labels + len(all_names))
        all_names.extend(names)
    if len(set(all_names)) != len(all_names):
        dup = sorted({n for n in all_names if all_names.count(n) > 1})[:3]
        raise ValueError(
            f"Omniglot sets {tuple(sets)} share characters (e.g. {dup}); the small background sets "
            "overlap each other and the full background set, so load only one of them"
        )
    source = TensorClassSource(
        torch.from_numpy(np.concatenate(all_images)),
        torch.from_numpy(np.concatenate(all_labels)),
        all_names,
        groups=[n.split("/")[0] for n in all_names],
        name=f"Omniglot {'+'.join(sets)}",
    )
    return with_rotations(source) if rotations else source


def omniglot_alphabet_split(
    source: ClassSource, counts: dict[str, int] | None = None, seed: int = 0
) -> dict[str, ClassSubset]:
    """Split Omniglot classes by alphabet (default: 25 alphabets for "train", 5 for "val"), never within one."""
    return split_by_group(source, counts=counts if counts is not None else {"train": 25, "val": 5}, seed=seed)


def read_split_file(path: str | os.PathLike) -> list[str]:
    """Class names listed in a split file (one ``Alphabet/characterNN[/rotDDD]`` per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found; {_DATA_ROOT_HINT} (it holds splits/vinyals/*.txt)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"split file {path} lists no classes; restore it from the original split")
    return names


def omniglot_vinyals_split(
    data_root: str | os.PathLike | None = None,
    part: str = "train",
    split_dir: str | os.PathLike | None = None,
    image_size: int = 28,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    url: str = OMNIGLOT_URL,
) -> ClassSubset:
    """The Vinyals et al. split part ("train", "val", "trainval", "test") with rotations as classes.

    The split lists characters of both the background and the evaluation alphabets, so both zips
    are needed. ``split_dir`` defaults to ``<omniglot>/splits/vinyals``.
    """
    if part not in ("train", "val", "trainval", "test"):
        raise ValueError(f"part must be 'train', 'val', 'trainval' or 'test', got {part!r}")
    omniglot_dir = find_omniglot_dir(data_root)
    split_dir = Path(split_dir) if split_dir is not None else omniglot_dir / "splits" / "vinyals"
    wanted = read_split_file(split_dir / f"{part}.txt")
    source = load_omniglot(
        omniglot_dir, ("background", "evaluation"), image_size, rotations=True,
        cache_dir=cache_dir, download=download, url=url,
    )
    index = {n: i for i, n in enumerate(source.class_names)}
    missing = [n for n in wanted if n not in index]
    if missing:
        raise ValueError(
            f"{len(missing)} classes of {split_dir / (part + '.txt')} are not in the Omniglot zips "
            f"(e.g. {missing[:3]}); check that the split file matches images_background.zip and "
            "images_evaluation.zip"
        )
    return ClassSubset(source, [index[n] for n in wanted])
