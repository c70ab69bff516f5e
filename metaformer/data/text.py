"""Text classification sources: JSON lines (text + label per line) and CLINC150's JSON layout."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from metaformer.data.source import TextClassSource

__all__ = ["encode_labels", "jsonl_text_source", "clinc150_source"]

_TEXT_KEYS = ("text", "raw", "sentence", "utterance")


def encode_labels(values: Sequence[Any], what: str) -> tuple[list[int], list[str]]:
    """Map raw labels (all ints or all strings) to class indices 0..C-1 in sorted order, plus class names."""
    if not values:
        raise ValueError(f"{what} is empty (no examples); check the file, split or filter")
    kinds = {type(v) for v in values}
    if kinds <= {int} or kinds <= {str}:
        uniq = sorted(set(values))
    else:
        bad = [v for v in values if not isinstance(v, (int, str)) or isinstance(v, bool)][:3]
        raise ValueError(
            f"{what}: labels must be all ints or all strings, got types {sorted(k.__name__ for k in kinds)}"
            + (f" (e.g. {bad})" if bad else "")
            + "; convert the label column to one type"
        )
    index = {v: i for i, v in enumerate(uniq)}
    return [index[v] for v in values], [str(v) for v in uniq]


def jsonl_text_source(
    path: str | os.PathLike,
    text_key: str | None = None,
    label_key: str = "label",
) -> TextClassSource:
    """Texts from a JSON-lines file, one ``{"text": ..., "label": ...}`` object per line.

    ``text_key`` defaults to the first of "text", "raw", "sentence", "utterance" present in the first
    line (HuffPost / FewRel-style files use "raw"). Labels may be ints or strings; classes are their
    sorted distinct values (so integer labels 0..C-1 keep their numbers as class indices).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found; pass the path of a JSON-lines file")
    texts: list[str] = []
    raw_labels: list[Any] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err}); each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object per line, got {type(obj).__name__}")
            if text_key is None:
                text_key = next((k for k in _TEXT_KEYS if k in obj), None)
                if text_key is None:
                    raise ValueError(
                        f"{path}:{n}: no text field among {_TEXT_KEYS} (keys: {sorted(obj)}); pass text_key=..."
                    )
            for key in (text_key, label_key):
                if key not in obj:
                    raise ValueError(
                        f"{path}:{n}: field {key!r} is missing (keys: {sorted(obj)}); "
                        f"pass text_key=/label_key= naming the right fields"
                    )
            if not isinstance(obj[text_key], str):
                raise ValueError(f"{path}:{n}: field {text_key!r} must be a string, got {type(obj[text_key]).__name__}")
            texts.append(obj[text_key])
            raw_labels.append(obj[label_key])
    labels, names = encode_labels(raw_labels, f"text file {path}")
    return TextClassSource(texts, labels, names, name=f"text file {path}")


def clinc150_source(
    path: str | os.PathLike,
    split: str | Sequence[str] = "train",
    include_oos: bool = False,
) -> TextClassSource:
    """CLINC150 intents from ``data_full.json`` (``{"train": [[text, intent], ...], "val", "test", "oos_*"}``).

    ``split`` is one key or several (e.g. ("train", "val")). ``include_oos`` adds the matching
    ``oos_<split>`` examples as the class "oos". Groups are the 10 domains when ``domains.json``
    lies next to the file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "data_full.json"
    if not path.is_file():
        raise FileNotFoundError(f"CLINC150 file {path} not found; pass the path of clinc150/data_full.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    splits = [split] if isinstance(split, str) else list(split)
    texts: list[str] = []
    intents: list[str] = []
    for s in splits:
        keys = [s] + ([f"oos_{s}"] if include_oos else [])
        for key in keys:
            if key not in data:
                raise ValueError(f"{path} has no split {key!r}; available: {sorted(data)}")
            for n, row in enumerate(data[key]):
                if not (isinstance(row, list) and len(row) == 2 and all(isinstance(v, str) for v in row)):
                    raise ValueError(f"{path}: {key}[{n}] is {row!r}; CLINC150 rows are [text, intent] pairs")
                texts.append(row[0])
                intents.append(row[1])
    labels, names = encode_labels(intents, f"CLINC150 {path} split {splits}")
    groups = None
    domains_file = path.parent / "domains.json"
    if domains_file.is_file():
        domain_of = {i: d for d, intents_ in json.loads(domains_file.read_text()).items() for i in intents_}
        domain_of.setdefault("oos", "oos")
        unknown = [n for n in names if n not in domain_of]
        if unknown:
            raise ValueError(f"{domains_file} has no domain for intents {unknown[:5]}; fix or remove domains.json")
        groups = [domain_of[n] for n in names]
    return TextClassSource(texts, labels, names, groups, name=f"CLINC150 {'+'.join(splits)}")
