"""``metaformer predict``: read a labelled support set and unlabelled queries from disk, write predictions.

Support (``--support``):

- a folder with one subfolder per class; each file in a class folder is one example: an image
  (``.png``, ``.jpg``, ...) or a text file (``.txt``, its whole content is one example);
- a ``.csv`` file with a header holding a text column (``text``, ``raw``, ``sentence`` or ``utterance``)
  and a ``label`` column;
- a ``.jsonl`` file, one ``{"text": ..., "label": ...}`` object per line (``raw`` etc. also accepted).

Queries (``--query``): a folder of files (images or ``.txt``), one image file, a ``.txt`` file (one
example per non-empty line), or a ``.csv`` / ``.jsonl`` file like the support (labels are ignored; an
``id`` column/field names the rows, otherwise the line number does).

Checkpoint (``--checkpoint``): a FewShotModel folder (``fewshot.json``, scripts/finetune_encoder.py), or a
``metaformer train`` run folder (its latest checkpoint, or ``--which best``), step folder or export; see
metaformer.inference.load_predict_model.

Output: per query its id, the predicted class and the probability of every class; CSV (columns
``id, prediction, p:<class>...``) or JSON (a list of ``{"id", "prediction", "probabilities"}``), chosen
by ``--format`` or the extension of ``--out`` (CSV on stdout without ``--out``).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from metaformer.data.images import IMAGE_EXTENSIONS

__all__ = ["read_support", "read_queries", "write_predictions", "run_predict", "check_checkpoint_folder", "InputError"]

TEXT_EXTENSIONS = (".txt",)
# Text files are read as "utf-8-sig": Excel's "CSV UTF-8" and Windows editors start them with a byte-order mark,
# which plain UTF-8 keeps as an invisible "\ufeff" glued to the first column name or example.
_TEXT_KEYS = ("text", "raw", "sentence", "utterance")


class InputError(ValueError):
    """A problem with the user's support, query or checkpoint files (reported as one line, exit status 2)."""


def _kind(path: Path) -> str:
    """'image' or 'text' by file extension; an InputError names any other file."""
    ext = path.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in TEXT_EXTENSIONS:
        return "text"
    raise InputError(f"{path} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a text file (.txt); "
                     "remove it or convert it")


def _read_text_file(path: Path) -> str:
    """The stripped content of a UTF-8 text file (an InputError names an unreadable or empty file)."""
    try:
        text = path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise InputError(f"cannot read text file {path}: not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                         "save it as UTF-8") from None
    except OSError as exc:
        raise InputError(f"cannot read file {path}: {exc.strerror or exc}") from None
    if not text:
        raise InputError(f"text file {path} is empty; every example needs some text")
    return text


def _one_modality(kinds: set[str], where: Path) -> str:
    """The single modality of a set of files, or an InputError for a mix."""
    if len(kinds) > 1:
        raise InputError(f"{where} mixes images and text files; use one kind of example per run")
    return kinds.pop()


def _visible(folder: Path) -> list[Path]:
    """Entries of a folder without hidden files (.DS_Store etc.), sorted by name."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _read_table(path: Path, need_label: bool) -> tuple[list[str], list[str], list[str]]:
    """(ids, texts, labels) from a .csv / .jsonl / .json-lines file."""
    rows: list[dict[str, Any]] = []
    try:
        if path.suffix.lower() == ".csv":
            with open(path, encoding="utf-8-sig", newline="") as f:
                rows = list(csv.DictReader(f))
            where = lambda n: f"{path} row {n + 2}"  # noqa: E731 - header is line 1
        else:
            with open(path, encoding="utf-8-sig") as f:
                lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
            for n, line in lines:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{n}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
                if not isinstance(obj, dict):
                    raise InputError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
                rows.append(obj)
            numbers = [n for n, _ in lines]
            where = lambda n: f"{path}:{numbers[n]}"  # noqa: E731
    except UnicodeDecodeError as exc:
        raise InputError(f"cannot read {path}: not valid UTF-8 ({exc.reason}); save it as UTF-8") from None
    except OSError as exc:
        raise InputError(f"cannot read file {path}: {exc.strerror or exc}") from None
    if not rows:
        raise InputError(f"{path} has no rows; it needs one example per line")
    keys = set(rows[0])
    text_key = next((k for k in _TEXT_KEYS if k in keys), None)
    if text_key is None:
        raise InputError(f"{path} has no text column among {_TEXT_KEYS} (found {sorted(keys)}); rename the text column")
    if need_label and "label" not in keys:
        raise InputError(f"{path} has no 'label' column (found {sorted(keys)}); the support set needs one label per example")
    ids, texts, labels = [], [], []
    for n, row in enumerate(rows):
        text = row.get(text_key)
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where(n)}: empty or missing {text_key!r}; every example needs text")
        if need_label and (row.get("label") is None or str(row.get("label")).strip() == ""):
            raise InputError(f"{where(n)}: missing label")
        texts.append(text)
        labels.append(str(row.get("label")) if need_label else "")
        ids.append(str(row["id"]) if row.get("id") not in (None, "") else str(n + 1))
    return ids, texts, labels


def read_support(path: str | Path) -> tuple[list[Any], list[str], str]:
    """(items, labels, modality) of a support folder or CSV/JSONL file; items are strings or image Paths."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"support {path} does not exist; pass a folder with one subfolder per class or a CSV/JSONL file")
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".jsonl", ".json"):
            raise InputError(f"support file {path} must be .csv or .jsonl (text + label); or pass a folder of class folders")
        _, texts, labels = _read_table(path, need_label=True)
        return texts, labels, "text"
    entries = _visible(path)
    stray = [p.name for p in entries if not p.is_dir()]
    if stray:
        raise InputError(f"support folder {path} has files outside class subfolders ({', '.join(stray[:3])}); "
                         "put each example in a subfolder named after its class")
    if not entries:
        raise InputError(f"support folder {path} has no class subfolders; add one subfolder per class")
    items: list[Any] = []
    labels: list[str] = []
    kinds: set[str] = set()
    for class_dir in entries:
        files = _visible(class_dir)
        if not files:
            raise InputError(f"class folder {class_dir} is empty; add at least one example or remove the folder")
        for f in files:
            if f.is_dir():
                raise InputError(f"{f} is a folder inside class folder {class_dir}; class folders hold example files only")
            kind = _kind(f)
            kinds.add(kind)
            items.append(_read_text_file(f) if kind == "text" else f)
            labels.append(class_dir.name)
    return items, labels, _one_modality(kinds, path)


def read_queries(path: str | Path) -> tuple[list[str], list[Any], str]:
    """(ids, items, modality) of a query folder or file; items are strings or image Paths."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"query {path} does not exist; pass a folder of examples or a .txt/.csv/.jsonl/image file")
    if path.is_dir():
        files = _visible(path)
        if not files:
            raise InputError(f"query folder {path} is empty; add the examples to classify")
        sub = [f.name for f in files if f.is_dir()]
        if sub:
            raise InputError(f"query folder {path} holds subfolders ({', '.join(sub[:3])}); pass a flat folder of examples")
        kinds = {_kind(f) for f in files}
        modality = _one_modality(kinds, path)
        items = [_read_text_file(f) for f in files] if modality == "text" else files
        return [f.name for f in files], items, modality
    ext = path.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return [path.name], [path], "image"
    if ext in (".csv", ".jsonl", ".json"):
        ids, texts, _ = _read_table(path, need_label=False)
        return ids, texts, "text"
    if ext in TEXT_EXTENSIONS:
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as exc:
            raise InputError(f"cannot read text file {path}: not valid UTF-8 ({exc.reason}); save it as UTF-8") from None
        kept = [(str(n), line.strip()) for n, line in enumerate(lines, 1) if line.strip()]
        if not kept:
            raise InputError(f"query file {path} has no non-empty lines")
        return [k for k, _ in kept], [t for _, t in kept], "text"
    raise InputError(f"query file {path}: unknown type {ext!r}; use a folder, an image, or a .txt/.csv/.jsonl file")


def write_predictions(ids: Sequence[str], classes: Sequence[Any], probs: Any, fmt: str, out: Optional[str]) -> None:
    """Write one row per query (id, predicted class, per-class probabilities) as CSV or JSON."""
    names = [str(c) for c in classes]
    preds = [names[int(i)] for i in probs.argmax(axis=1)]
    if fmt == "json":
        rows = [{"id": i, "prediction": p, "probabilities": {c: float(v) for c, v in zip(names, row)}}
                for i, p, row in zip(ids, preds, probs.tolist())]
        text = json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    else:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["id", "prediction"] + [f"p:{c}" for c in names])
        for i, p, row in zip(ids, preds, probs.tolist()):
            w.writerow([i, p] + [f"{v:.6f}" for v in row])
        text = buf.getvalue()
    if out is None:
        sys.stdout.write(text)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text, encoding="utf-8")


def _trainer_model_name(path: Path, which: str) -> Optional[str]:
    """model.name in the config of the checkpoint a `metaformer train` folder resolves to (None if unreadable)."""
    import yaml

    from training import checkpoint as ckpt_io

    step = ckpt_io.resolve_checkpoint(path, which)  # a CheckpointError names a run without the asked checkpoint
    try:
        cfg = yaml.safe_load((step / ckpt_io.CONFIG_FILE).read_text(encoding="utf-8"))
        return str(cfg["model"]["name"])
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        return None  # a damaged checkpoint: loading it reports that


def check_checkpoint_folder(path: str | Path, inner_steps: Optional[int] = None, which: str = "latest") -> None:
    """Cheap checks of --checkpoint before any data is read: a few-shot or `metaformer train` checkpoint folder whose
    head fits --inner-steps and --which."""
    from metaformer.inference import MODEL_FILE, checkpoint_kind

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"checkpoint folder {path} does not exist; pass the folder written by "
                         "FewShotModel.save_pretrained or scripts/finetune_encoder.py, or a `metaformer train` run "
                         "folder, step folder or export")
    kind = checkpoint_kind(path)
    if kind == "trainer":
        from training import checkpoint as ckpt_io

        if not (ckpt_io.is_checkpoint_dir(path) or ckpt_io.list_checkpoints(path)):
            raise InputError(f"{path} is a `metaformer train` run folder without a checkpoint yet (no step-XXXXXXXX "
                             "folder: the trainer writes one every train.ckpt_every steps and at the end); wait for "
                             "its first checkpoint, or pass a run folder that has one")
        name = _trainer_model_name(path, which)
        if inner_steps is not None and name is not None:
            from metaformer.heads import head_class
            from metaformer.heads.gradient import GradientHead
            from training.registry import HEADS

            if name not in HEADS or not issubclass(head_class(name), GradientHead):
                raise InputError(f"--inner-steps applies to MAML-family checkpoints only (gradient steps on the "
                                 f"support set); {path} holds a {name!r} model: drop --inner-steps")
        return
    if kind is None:
        # scripts/finetune_encoder.py writes OUT/checkpoint: passing OUT is the usual slip
        below = [d for d in _visible(path) if d.is_dir() and (d / MODEL_FILE).is_file()]
        if below:
            hint = f"did you mean {below[0]}?" if len(below) == 1 else \
                f"did you mean one of {', '.join(str(d) for d in below[:3])}{' ...' if len(below) > 3 else ''}?"
        else:
            hint = ("pass the folder written by FewShotModel.save_pretrained or scripts/finetune_encoder.py, or a "
                    "`metaformer train` run folder, one of its step-XXXXXXXX folders or a `metaformer export` folder")
        raise InputError(f"{path} is not a few-shot checkpoint (it has no {MODEL_FILE}); {hint}")
    if which != "latest":
        raise InputError(f"--which {which} chooses a checkpoint of a `metaformer train` run folder; {path} is a "
                         "few-shot checkpoint folder (one model): drop --which")
    if inner_steps is not None:
        try:
            head = json.loads((path / MODEL_FILE).read_text(encoding="utf-8")).get("head")
        except (ValueError, AttributeError):
            return  # a damaged file: loading the checkpoint reports it
        if head != "maml":
            raise InputError(f"--inner-steps applies to MAML checkpoints only; {path} holds a {head!r} head: "
                             "drop --inner-steps")


def run_predict(args: Any) -> int:
    """The predict subcommand: load, fit on the support set, predict the queries, write the output."""
    from metaformer.inference import FewShotPredictor, load_predict_model
    from training.eval_cli import check_device

    # the options first, each with its own message, before any file is read or the model is loaded
    device = check_device(args.device)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.inner_steps is not None and args.inner_steps < 0:
        raise InputError(f"--inner-steps must be >= 0, got {args.inner_steps}")
    which = getattr(args, "which", "latest")
    check_checkpoint_folder(args.checkpoint, args.inner_steps, which)
    fmt = args.format or ("json" if args.out and str(args.out).lower().endswith(".json") else "csv")
    s_items, s_labels, s_mod = read_support(args.support)
    q_ids, q_items, q_mod = read_queries(args.query)
    if s_mod != q_mod:
        raise InputError(f"the support set holds {s_mod} but the queries hold {q_mod}; use one modality")
    try:
        model = load_predict_model(args.checkpoint, which)
    except (FileNotFoundError, ValueError) as exc:  # CheckpointError and ConfigError are ValueErrors
        raise InputError(f"cannot load checkpoint {args.checkpoint}: {exc}") from None
    predictor = FewShotPredictor(model, device=device, batch_size=args.batch_size, inner_steps=args.inner_steps)
    if predictor.modality != q_mod:
        raise InputError(f"the queries ({args.query}) are {q_mod} but the checkpoint's model reads {predictor.modality}; "
                         f"pass {predictor.modality} examples")
    predictor.fit(s_items, s_labels)
    probs = predictor.predict_proba(q_items)
    write_predictions(q_ids, predictor.classes_, probs, fmt, args.out)
    if args.out:
        print(f"wrote {len(q_ids)} predictions over {len(predictor.classes_)} classes to {args.out}", file=sys.stderr)
    return 0
