"""Few-shot inference: an encoder plus a head in one saved folder, and a scikit-learn style predictor.

:class:`FewShotModel` is ``encoder -> head``: the encoder (an :class:`~metaformer.models.HFEncoder`)
embeds raw items (strings or image tensors) and the head works on those features: the in-context
Meta-Transformer, ProtoNet or MAML (their backbone is the identity or a small MLP over the features).
Keeping the head on features lets a frozen encoder's embeddings be computed once per data set.

:class:`FewShotPredictor` wraps a saved model: ``fit(support_items, labels)`` stores the embedded
support set (and adapts ProtoNet / MAML), ``predict_proba(items)`` gives one column per class (in
``classes_`` order), ``predict(items)`` the most probable class. Classes may have different numbers of
shots. More classes than the head's ``max_way`` are handled by the *hierarchical tournament*:

1. the C classes are split, in ``classes_`` order, into ceil(C / max_way) chunks of nearly equal size;
2. each chunk is one episode: the model gives ``P(c | chunk)`` for every query;
3. per query, each chunk's most probable class represents it in a second episode over the chunk
   representatives (chunked again the same way when there are more than max_way chunks), whose
   probabilities are ``P(chunk)``;
4. ``P(c) = P(chunk of c) * P(c | chunk of c)``, which sums to one over the C classes.

``on_too_many_ways="error"`` raises instead.

:class:`TrainedFewShotModel` makes a ``metaformer train`` checkpoint (a run folder, one of its step folders, a
``metaformer export`` folder, ``pretrained/omniglot_meta_transformer``) usable the same way: there the "encoder" is
the identity over image tensors, the trained learner is the head, and :class:`ImagePreprocessing` (built from the
checkpoint's config) turns image files into the tensors its training data pipeline produced.
:func:`load_predict_model` loads either kind of folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaformer.data.episodes import EpisodeBatch
from metaformer.models.backbones import MLP
from metaformer.models.hf_encoder import FeatureIdentity, HFEncoder
from metaformer.models.meta_transformer import MetaTransformer, MetaTransformerConfig

__all__ = [
    "FewShotModel", "FewShotPredictor", "HEAD_TYPES", "featurize_batch", "embed_items", "load_image_files",
    "feature_source", "evaluate_features", "episode_logits", "build_feature_head", "ImagePreprocessing",
    "TrainedFewShotModel", "load_predict_model", "checkpoint_kind", "decode_drawing",
]

HEAD_TYPES = ("meta_transformer", "protonet", "maml")
MODEL_FILE = "fewshot.json"
WEIGHTS_FILE = "model.safetensors"
ENCODER_DIR = "encoder"
FORMAT = "metaformer-fewshot/1"
# data.source values of `metaformer train` whose items are images, and how image files are turned into them
IMAGE_SOURCES = ("glyph", "omniglot")


def _feature_net(dim: int, feature_net: str, hidden: int, layers: int) -> nn.Module:
    """The head's backbone over encoder features: identity or a small MLP."""
    if feature_net == "identity":
        return FeatureIdentity(dim)
    if feature_net == "mlp":
        return MLP(in_dim=dim, hidden=hidden, num_layers=layers)
    raise ValueError(f"feature_net must be 'identity' or 'mlp', got {feature_net!r}")


def build_feature_head(name: str, dim: int, options: dict[str, Any]) -> nn.Module:
    """A head over ``dim``-d features: "meta_transformer" (MetaTransformerConfig fields), "protonet" or "maml"."""
    opts = dict(options)
    if name == "meta_transformer":
        try:
            cfg = MetaTransformerConfig(**{**opts, "backbone": "features"})
        except TypeError as exc:
            raise ValueError(f"meta_transformer head options must be MetaTransformerConfig fields: {exc}") from None
        return MetaTransformer(cfg, backbone=FeatureIdentity(dim))
    from metaformer.heads import build_head

    feature_net = opts.pop("feature_net", "identity" if name == "protonet" else "mlp")
    hidden = int(opts.pop("hidden", 256))
    layers = int(opts.pop("layers", 1))
    backbone = _feature_net(dim, feature_net, hidden, layers)
    if name not in ("protonet", "maml"):
        raise ValueError(f"unknown head {name!r}; choose one of {HEAD_TYPES}")
    return build_head(name, backbone, **opts)


def embed_items(encoder: nn.Module, items: Any, batch_size: int = 64) -> Tensor:
    """Encoder features of a flat list of strings or an image tensor [N, C, H, W], in batches -> [N, D]."""
    n = len(items) if isinstance(items, (list, tuple)) else int(items.shape[0])
    if n == 0:
        raise ValueError("no items to embed")
    # image tensors go to the encoder's device one batch at a time (a data set may not fit on it); text
    # encoders tokenise onto their own device
    param = next(encoder.parameters(), None)
    out = []
    for start in range(0, n, batch_size):
        chunk = items[start:start + batch_size]
        if isinstance(chunk, Tensor) and param is not None:
            chunk = chunk.to(param.device)
        out.append(encoder(chunk))
    return torch.cat(out)


def featurize_batch(encoder: nn.Module, batch: EpisodeBatch) -> EpisodeBatch:
    """The same EpisodeBatch with support/query items replaced by encoder features [T, S, D] / [T, Q, D].

    The real items of all tasks go through the encoder in one call (padding never does), and the
    features keep their autograd graph, so a head's loss trains a non-frozen encoder.
    """
    def flat(x: Any, mask: Tensor) -> Any:
        """The real (unpadded) items of a [T, N, ...] tensor or T lists, task by task."""
        if isinstance(x, Tensor):
            return x[mask]
        return [item for items, m in zip(x, mask.tolist()) for item, keep in zip(items, m) if keep]

    s_items, q_items = flat(batch.support_x, batch.support_mask), flat(batch.query_x, batch.query_mask)
    n_s = int(batch.support_mask.sum())
    feats = encoder(torch.cat([s_items, q_items]) if isinstance(s_items, Tensor) else list(s_items) + list(q_items))
    t, s = batch.support_mask.shape
    q = batch.query_mask.shape[1]
    d = feats.shape[-1]
    sx = feats.new_zeros(t, s, d).index_put(batch.support_mask.nonzero(as_tuple=True), feats[:n_s])
    qx = feats.new_zeros(t, q, d).index_put(batch.query_mask.nonzero(as_tuple=True), feats[n_s:])
    return EpisodeBatch(sx, batch.support_y, batch.support_mask, qx, batch.query_y, batch.query_mask,
                        batch.n_way, batch.class_names)


def episode_logits(head: nn.Module, batch: EpisodeBatch) -> Tensor:
    """Logits [T, Q, N] of a feature EpisodeBatch for any feature head (Meta-Transformer or FewShotHead)."""
    if isinstance(head, MetaTransformer):
        return head(batch)
    predictor = head.adapt_batch(batch.support_x, batch.support_y, batch.support_mask, batch.n_way)
    return predictor(batch.query_x, batch.query_mask)


class FewShotModel(nn.Module):
    """``encoder -> head``: raw items to few-shot logits; ``save_pretrained`` / ``from_pretrained`` one folder."""

    def __init__(self, encoder: HFEncoder, head: str = "meta_transformer", head_options: Optional[dict[str, Any]] = None) -> None:
        """``head`` is one of HEAD_TYPES; ``head_options`` its settings (e.g. max_way, inner_steps, feature_net)."""
        super().__init__()
        if head not in HEAD_TYPES:
            raise ValueError(f"head must be one of {HEAD_TYPES}, got {head!r}")
        self.encoder = encoder
        self.head_name = head
        self.head_options = json.loads(json.dumps(head_options or {}))
        self.head = build_feature_head(head, encoder.out_dim, self.head_options)

    @property
    def modality(self) -> str:
        """'text' or 'image': what the encoder reads."""
        return self.encoder.modality

    @property
    def max_way(self) -> Optional[int]:
        """Most classes one episode may have (None: unlimited, ProtoNet)."""
        if isinstance(self.head, MetaTransformer):
            return self.head.config.max_way
        if self.head_name == "protonet":
            return None
        return self.head.n_out

    def read_image_files(self, paths: Sequence[str | Path]) -> Tensor:
        """Image files -> the encoder's input tensor [N, C, H, W] in [0, 1] (its channels and size)."""
        return load_image_files(paths, self.encoder.num_channels, self.encoder.image_size)

    def loss(self, batch: EpisodeBatch) -> tuple[Tensor, dict[str, float]]:
        """Meta-training loss of a raw-item EpisodeBatch (features computed here, gradients reach the encoder)."""
        return self.head.loss(featurize_batch(self.encoder, batch))

    def forward(self, batch: EpisodeBatch) -> tuple[Tensor, dict[str, float]]:  # type: ignore[override]
        """Same as loss(batch)."""
        return self.loss(batch)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``fewshot.json``, ``encoder/`` (config, tokenizer/processor) and ``model.safetensors``."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(directory / ENCODER_DIR)
        meta = {"format": FORMAT, "head": self.head_name, "head_options": self.head_options,
                "modality": self.modality, "out_dim": self.encoder.out_dim}
        # save_model deduplicates tied tensors, which save_file refuses.
        save_model(self, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
        (directory / MODEL_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "FewShotModel":
        """Load a folder written by ``save_pretrained``; clear errors for missing or foreign files."""
        from safetensors.torch import load_model

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint folder {directory} does not exist; pass the folder written by "
                                    "FewShotModel.save_pretrained or scripts/finetune_encoder.py")
        meta_file, weights = directory / MODEL_FILE, directory / WEIGHTS_FILE
        for p in (meta_file, weights, directory / ENCODER_DIR):
            if not p.exists():
                raise FileNotFoundError(f"{p} not found; {directory} is not a few-shot checkpoint "
                                        "(written by FewShotModel.save_pretrained / scripts/finetune_encoder.py)")
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{meta_file} is not valid JSON ({exc})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_file} has format {meta.get('format')!r}; this version reads {FORMAT!r}")
        encoder = HFEncoder.from_saved_config(directory / ENCODER_DIR)
        model = cls(encoder, meta["head"], meta.get("head_options", {}))
        missing, unexpected = load_model(model, str(weights), strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights} does not match the architecture in {meta_file}: "
                             f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        return model.to(map_location).eval()


def load_image_files(paths: Sequence[str | Path], num_channels: int, image_size: Optional[tuple[int, int]] = None) -> Tensor:
    """Decode image files to a float tensor [N, C, H, W] in [0, 1] (a clear error names an unreadable file)."""
    from metaformer.data.images import decode_image

    mode = "L" if num_channels == 1 else "RGB"
    arrays = [decode_image(p, str(p), mode, image_size) for p in paths]
    return torch.from_numpy(np.stack(arrays)).float().div_(255.0)


def decode_drawing(data: str | Path | bytes, what: str, image_size: int) -> np.ndarray:
    """A user's image file of a dark drawing on light paper -> uint8 [1, S, S] with strokes = 255, by the Omniglot
    decoding (metaformer.data.images.decode_stroke_image: grayscale, inverted, LANCZOS-resized), which it equals bit
    for bit on opaque square images. Before that decoding:

    - transparency is flattened onto white paper (a transparent background would otherwise read as black, i.e. as
      ink after the inversion: an all-ink image);
    - a non-square image is padded with white paper to a centred square, so the drawing keeps its aspect ratio (the
      training images are square) instead of being stretched;
    - an image whose border is mostly dark (light strokes on a dark background, the inverse of what the model reads)
      is refused with a ValueError naming the file, rather than classified inverted.
    """
    from PIL import Image

    from metaformer.data.images import _open

    try:
        img = _open(data, what)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"cannot read image {what}: {exc}; downscale it (the model reads {image_size}x{image_size} "
                         "images) and try again") from None
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(paper, rgba)
    img = img.convert("L")
    w, h = img.size
    if w != h:
        side = max(w, h)
        square = Image.new("L", (side, side), 255)
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        img = square
    gray = np.asarray(img, dtype=np.uint8)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) < 128:
        raise ValueError(f"image {what} looks like light strokes on a dark background (its border is mostly dark, "
                         f"median {int(np.median(border))} of 255); the model reads dark drawings on light paper, as "
                         "the Omniglot images: invert the image (e.g. PIL.ImageOps.invert) and try again")
    # decode_stroke_image's own steps: invert before resizing, then LANCZOS to the training size
    img = Image.fromarray(255 - gray)
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)[None]


class ImagePreprocessing:
    """Image files -> the tensors a `metaformer train` model saw in training, from its config (data.source, image_size).

    Both image sources draw strokes as 1 on a 0 background: Omniglot decodes its black-on-white PNGs by inverting
    them before the LANCZOS resize (metaformer.data.images.decode_stroke_image) and scales the uint8 result by 1/255
    (TensorClassSource.get_items); the glyph family renders strokes = 1 directly. Files are therefore read as dark
    drawings on light paper and go through exactly that decoding, so a file of the training set gives the training
    tensor bit for bit. Training-only augmentations (rotations and mirrors as new classes, affine warps) are not
    applied: they make new training examples, not a different input format.
    """

    def __init__(self, source: str, image_size: int, num_channels: int = 1) -> None:
        """``source`` one of IMAGE_SOURCES; ``image_size`` the square side; ``num_channels`` 1 (grayscale)."""
        if source not in IMAGE_SOURCES:
            raise ValueError(f"no image preprocessing for data.source={source!r}; image sources: {IMAGE_SOURCES}")
        if num_channels != 1:
            raise ValueError(f"data.source={source} images have 1 channel, got num_channels={num_channels}")
        self.source, self.image_size, self.num_channels = source, int(image_size), int(num_channels)

    @classmethod
    def from_config(cls, cfg: Any, where: str = "the checkpoint") -> "ImagePreprocessing":
        """The preprocessing of a training Config; a ValueError says why a regression or non-image model is refused."""
        source = cfg.data.source
        if source == "sinusoid":
            raise ValueError(f"{where} is a regression model (data.source=sinusoid: it predicts y values from scalar "
                             "x inputs, it has no classes); predict classifies images: pass a checkpoint of a model "
                             f"trained on {' or '.join(IMAGE_SOURCES)} images")
        if source not in IMAGE_SOURCES:
            raise ValueError(f"{where} was trained on data.source={source!r}, which is not an image source "
                             f"({', '.join(IMAGE_SOURCES)}), so predict does not know how its inputs were made; "
                             "for text, use a FewShotModel folder written by scripts/finetune_encoder.py")
        from training.registry import in_channels

        return cls(source, cfg.data.image_size, in_channels(cfg))

    def __repr__(self) -> str:
        """The settings, e.g. ImagePreprocessing(source='omniglot', image_size=28, num_channels=1)."""
        return f"ImagePreprocessing(source={self.source!r}, image_size={self.image_size}, num_channels={self.num_channels})"

    def load(self, paths: Sequence[str | Path]) -> Tensor:
        """Decode image files -> float32 [N, 1, S, S], strokes = 1 (a clear error names an unreadable file)."""
        if len(paths) == 0:
            raise ValueError("no image files to read")
        arrays = [decode_drawing(p, str(p), self.image_size) for p in paths]
        # the same operation as TensorClassSource.get_items: multiplying by 1/255 rounds differently from / 255
        return torch.from_numpy(np.stack(arrays)).mul(1.0 / 255.0)

    def check_tensor(self, x: Tensor, what: str) -> None:
        """A ValueError when an already-decoded image tensor [N, C, H, W] has another shape than training images."""
        want = (self.num_channels, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != want:
            raise ValueError(f"{what}: this model was trained on [N, {', '.join(map(str, want))}] images "
                             f"({self.source}), got {tuple(x.shape)}; pass image files (they are decoded and resized "
                             "here) or tensors of that shape with strokes = 1 on 0")


class ImageInputs(nn.Module):
    """The identity over image tensors: a trainer model's own backbone reads the pixels (the "encoder" slot)."""

    modality = "image"

    def __init__(self, preprocessing: ImagePreprocessing) -> None:
        """Inputs of the shape ``preprocessing`` produces."""
        super().__init__()
        self.num_channels, self.image_size = preprocessing.num_channels, preprocessing.image_size

    def forward(self, x: Tensor) -> Tensor:
        """``x`` unchanged."""
        return x


class TrainedFewShotModel(nn.Module):
    """A `metaformer train` checkpoint for FewShotPredictor: preprocessing, and the trained learner as the head.

    The head works on image tensors (its backbone is inside it), so ``encoder`` is the identity and embedding a
    set of items is only decoding its files. Build it with :meth:`from_checkpoint`.
    """

    def __init__(self, model: nn.Module, config: Any, preprocessing: ImagePreprocessing, path: Optional[Path] = None,
                 step: Optional[int] = None) -> None:
        """``model`` built from ``config`` (training.registry) with its weights; ``path`` / ``step`` for messages."""
        super().__init__()
        self.encoder = ImageInputs(preprocessing)
        self.head = model
        self.head_name = config.model.name
        self.config = config
        self.preprocessing = preprocessing
        self.path, self.step = path, step
        self._wider: dict[int, nn.Module] = {}

    @classmethod
    def from_checkpoint(cls, path: str | Path, which: str = "latest") -> "TrainedFewShotModel":
        """Load a run folder (its ``which`` checkpoint: latest or best), a step folder or an export, on the CPU in eval
        mode; a ValueError (CheckpointError, ConfigError) names a damaged, regression or non-image checkpoint."""
        import copy

        from training import checkpoint as ckpt_io
        from training.registry import PRETRAINED_HEADS, build_model

        ckpt = ckpt_io.read_checkpoint(path, with_trainer_state=False, which=which)
        # refused before the model is built: a regression or text model would otherwise fail later, less clearly
        preprocessing = ImagePreprocessing.from_config(ckpt.config, where=f"checkpoint {ckpt.path}")
        # what training.eval_cli.load_model builds, from the checkpoint already read and verified
        cfg = copy.deepcopy(ckpt.config)
        options = dict(cfg.model.options or {})
        if cfg.model.name in PRETRAINED_HEADS and "num_classes" not in options:
            # the transfer baselines size their pre-training classifier by counting the training classes, which needs
            # the training data; the checkpoint's classifier has that many rows (predict never uses it)
            table = ckpt.model_state.get("classifier.weight", ckpt.model_state.get("cosine_weight"))
            if table is not None:
                cfg.model.options = {**options, "num_classes": int(table.shape[0])}
        model = build_model(cfg)
        ckpt_io.load_weights_into(model, ckpt, cfg.model.name)
        return cls(model.eval(), ckpt.config, preprocessing, ckpt.path, ckpt.step).eval()

    @property
    def modality(self) -> str:
        """Always 'image'."""
        return "image"

    @property
    def max_way(self) -> Optional[int]:
        """Most classes one episode may have: the Meta-Transformer's max_way, a gradient head's outputs; None for
        heads without per-way weights (ProtoNet, MatchingNet, the transfer baselines)."""
        if isinstance(self.head, MetaTransformer):
            return self.head.config.max_way
        if not getattr(self.head, "fixed_ways", True):
            return None
        return int(self.head.n_out)

    def read_image_files(self, paths: Sequence[str | Path]) -> Tensor:
        """Image files -> [N, C, S, S] tensors exactly as the training data pipeline makes them."""
        return self.preprocessing.load(paths)

    def head_for(self, n_way: int) -> nn.Module:
        """The head sized for ``n_way`` classes: itself, or for more ways than it was built for (heads without per-way
        weights only) a shallow copy with that many outputs that shares every parameter."""
        if n_way <= self.head.n_out:
            return self.head
        if self.max_way is not None:
            raise ValueError(f"{n_way} ways but {self.head_name} has {self.head.n_out} class outputs")
        if n_way not in self._wider:
            import copy

            # n_out only sizes the one-hot class tables of these heads (no parameter has a row per way), so a copy
            # with a larger n_out computes the same prototypes / attention / per-task classifier for every class
            wide = copy.copy(self.head)
            wide.n_out = int(n_way)
            self._wider[n_way] = wide
        return self._wider[n_way]

    def forward(self, batch: EpisodeBatch) -> tuple[Tensor, dict[str, float]]:  # type: ignore[override]
        """The trained model's loss of an image EpisodeBatch."""
        return self.head.loss(batch)


def checkpoint_kind(path: str | Path) -> Optional[str]:
    """'fewshot' (a FewShotModel folder), 'trainer' (a `metaformer train` run, step or export folder) or None."""
    from training import checkpoint as ckpt_io

    path = Path(path)
    if not path.is_dir():
        return None
    if (path / MODEL_FILE).is_file():
        return "fewshot"
    # a run folder gets its config.yaml at the start, its first step folder at train.ckpt_every: without one yet it
    # is still a trainer folder, and the trainer's loader says that it holds no checkpoint
    if ckpt_io.is_checkpoint_dir(path) or (path / ckpt_io.CONFIG_FILE).is_file() or ckpt_io.list_checkpoints(path):
        return "trainer"
    return None


def load_predict_model(path: str | Path, which: str = "latest") -> "FewShotModel | TrainedFewShotModel":
    """A FewShotModel folder (fewshot.json) or a `metaformer train` checkpoint (run folder: its ``which`` one), on the
    CPU in eval mode."""
    path = Path(path)
    kind = checkpoint_kind(path)
    if kind == "trainer":
        return TrainedFewShotModel.from_checkpoint(path, which)
    if kind is None and path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a few-shot checkpoint: it has no {MODEL_FILE} (a FewShotModel folder) and no meta.json or "
            "step-XXXXXXXX folders (a `metaformer train` checkpoint); pass the folder written by "
            "FewShotModel.save_pretrained or scripts/finetune_encoder.py, or a `metaformer train` run folder, one of "
            "its step folders or a `metaformer export` folder")
    if which != "latest":
        raise ValueError(f"which={which!r} chooses a checkpoint of a `metaformer train` run folder; {path} is a "
                         "FewShotModel folder (one model): leave which at 'latest'")
    return FewShotModel.from_pretrained(path, map_location="cpu")


class FewShotPredictor:
    """scikit-learn style few-shot classifier over a saved FewShotModel: fit / predict / predict_proba."""

    def __init__(self, model: "FewShotModel | TrainedFewShotModel", device: str | torch.device = "cpu", batch_size: int = 64,
                 inner_steps: Optional[int] = None, on_too_many_ways: str = "chunk") -> None:
        """``inner_steps`` overrides MAML's test-time steps; ``on_too_many_ways``: "chunk" (tournament) or "error"."""
        if on_too_many_ways not in ("chunk", "error"):
            raise ValueError(f"on_too_many_ways must be 'chunk' or 'error', got {on_too_many_ways!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.on_too_many_ways = on_too_many_ways
        if inner_steps is not None:
            if not hasattr(model.head, "eval_inner_steps"):
                raise ValueError(f"inner_steps applies to MAML heads only (the gradient-based heads); this model's "
                                 f"head is {model.head_name!r}")
            if inner_steps < 0:
                raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
            model.head.eval_inner_steps = int(inner_steps)
        self.classes_: Optional[list[Any]] = None
        self._support: Optional[tuple[Tensor, Tensor]] = None
        self._adapted: dict[tuple[int, ...], Any] = {}

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu", which: str = "latest",
                        **kw: Any) -> "FewShotPredictor":
        """Load a FewShotModel folder or a `metaformer train` run / step / export folder (see load_predict_model)."""
        return cls(load_predict_model(directory, which), device=device, **kw)

    # ------------------------------------------------------------------ items
    @property
    def modality(self) -> str:
        """'text' or 'image'."""
        return self.model.modality

    def _as_inputs(self, items: Any, what: str) -> Any:
        """Check the modality and turn items into encoder inputs (list of str, or image tensor [N, C, H, W])."""
        if isinstance(items, np.ndarray):
            items = torch.from_numpy(items)
        is_images = isinstance(items, Tensor) or (
            isinstance(items, (list, tuple)) and len(items) > 0 and all(isinstance(v, Path) for v in items))
        is_text = isinstance(items, (list, tuple)) and all(isinstance(v, str) for v in items)
        if not (is_images or is_text):
            raise ValueError(f"{what} must be a list of strings (text) or images (a [N, C, H, W] tensor in [0, 1] or "
                             f"a list of pathlib.Path image files), got {type(items).__name__}")
        if len(items) == 0:
            raise ValueError(f"{what} is empty; pass at least one item")
        if is_images and self.modality == "text":
            raise ValueError(f"{what} are images, but this model's encoder reads text; pass a list of strings")
        if is_text and self.modality == "image":
            raise ValueError(f"{what} are text, but this model's encoder reads images; pass image files or a tensor")
        if is_images and not isinstance(items, Tensor):
            items = self.model.read_image_files(items)
        if isinstance(items, Tensor) and items.dim() != 4:
            raise ValueError(f"{what}: image tensor must be [N, C, H, W], got {tuple(items.shape)}")
        if isinstance(items, Tensor) and isinstance(self.model, TrainedFewShotModel):
            self.model.preprocessing.check_tensor(items, what)
        return list(items) if is_text else items

    def embed(self, items: Any) -> Tensor:
        """Encoder features [N, D] of raw items, computed in batches of ``batch_size``."""
        return self._embed_inputs(self._as_inputs(items, "items"))

    @torch.no_grad()
    def _embed_inputs(self, x: Any) -> Tensor:
        """Features of inputs already checked by ``_as_inputs``."""
        if isinstance(x, Tensor):
            x = x.to(self.device)
        return embed_items(self.model.encoder, x, self.batch_size)

    # ------------------------------------------------------------------ fit / predict
    def fit(self, support_items: Any, labels: Sequence[Any]) -> "FewShotPredictor":
        """Store the embedded support set; classes are the sorted distinct labels (any number of shots each)."""
        x = self._as_inputs(support_items, "support items")
        labels = list(labels.tolist() if isinstance(labels, (np.ndarray, Tensor)) else labels)
        if len(labels) != len(x):
            raise ValueError(f"got {len(x)} support items but {len(labels)} labels; pass one label per item")
        try:
            classes = sorted(set(labels))
        except TypeError:
            raise ValueError("labels must be all of one sortable type (e.g. all strings or all ints)") from None
        if len(classes) < 2:
            raise ValueError(f"the support set has {len(classes)} class; few-shot classification needs at least 2")
        max_way = self.model.max_way
        if max_way is not None and len(classes) > max_way and self.on_too_many_ways == "error":
            raise ValueError(f"{len(classes)} classes but the model handles at most {max_way} per episode; "
                             "use on_too_many_ways='chunk' (hierarchical tournament) or fewer classes")
        index = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([index[v] for v in labels], dtype=torch.int64, device=self.device)
        feats = self._embed_inputs(x)
        self.classes_ = classes
        self._support = (feats, y)
        self._adapted = {}
        return self

    def _check_fitted(self) -> tuple[Tensor, Tensor]:
        """The support features and labels, or a clear error before fit."""
        if self._support is None:
            raise RuntimeError("call fit(support_items, labels) before predict / predict_proba")
        return self._support

    @torch.no_grad()
    def predict_proba(self, items: Any) -> np.ndarray:
        """Class probabilities [N, C] (columns in ``classes_`` order) for raw items."""
        self._check_fitted()
        q = self._embed_inputs(self._as_inputs(items, "query items"))
        probs = [self._proba(list(range(len(self.classes_))), q[i:i + self.batch_size])
                 for i in range(0, q.shape[0], self.batch_size)]
        return torch.cat(probs).float().cpu().numpy()

    def predict(self, items: Any) -> list[Any]:
        """The most probable class of each item (values from ``classes_``)."""
        p = self.predict_proba(items)
        return [self.classes_[int(i)] for i in p.argmax(axis=1)]

    # ------------------------------------------------------------------ episodes
    def _proba(self, classes: list[int], q: Tensor) -> Tensor:
        """P(class | query) over ``classes`` (indices into classes_) -> [Q, len(classes)], by tournament if needed."""
        m = self.model.max_way
        if m is None or len(classes) <= m:
            return self._episode_proba(tuple(classes), q)
        n_chunks = math.ceil(len(classes) / m)
        chunks = [list(c) for c in np.array_split(np.array(classes), n_chunks)]
        within = [self._episode_proba(tuple(int(v) for v in c), q) for c in chunks]  # P(c | chunk)
        reps = torch.stack([torch.tensor(c, device=q.device)[w.argmax(dim=1)] for c, w in zip(chunks, within)], dim=1)
        p_chunk = q.new_zeros(q.shape[0], n_chunks)
        # Queries whose chunk representatives coincide share one second-round episode.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, row in enumerate(reps.tolist()):
            groups.setdefault(tuple(row), []).append(i)
        for rep, rows in groups.items():
            idx = torch.tensor(rows, device=q.device)
            p_chunk[idx] = self._proba(list(rep), q[idx])
        return torch.cat([p_chunk[:, j:j + 1] * w for j, w in enumerate(within)], dim=1)

    def _episode_proba(self, classes: tuple[int, ...], q: Tensor) -> Tensor:
        """Softmax over one episode whose ways are ``classes`` (<= max_way) -> [Q, len(classes)]."""
        feats, y = self._check_fitted()
        keep = torch.isin(y, torch.tensor(classes, device=y.device))
        remap = torch.full((len(self.classes_),), -1, dtype=torch.int64, device=y.device)
        remap[torch.tensor(classes, device=y.device)] = torch.arange(len(classes), device=y.device)
        s_x, s_y = feats[keep], remap[y[keep]]
        n = len(classes)
        head = self.model.head
        if isinstance(head, MetaTransformer):
            batch = EpisodeBatch(
                s_x[None], s_y[None], torch.ones(1, s_x.shape[0], dtype=torch.bool, device=q.device),
                q[None], torch.full((1, q.shape[0]), -1, dtype=torch.int64, device=q.device),
                torch.ones(1, q.shape[0], dtype=torch.bool, device=q.device),
                torch.tensor([n], device=q.device), [[str(c) for c in classes]])
            logits = head(batch)[0, :, :n]
        else:
            if classes not in self._adapted:
                self._adapted[classes] = self._adapt(s_x, s_y, n)
            logits = self._adapted[classes](q)[:, :n]
        return F.softmax(logits.float(), dim=-1)

    def _adapt(self, s_x: Tensor, s_y: Tensor, n: int) -> Any:
        """Adapt ProtoNet / MAML to one support set -> callable query features [Q, D] -> logits [Q, >= n]."""
        if isinstance(self.model, TrainedFewShotModel):
            return self.model.head_for(n).adapt(s_x, s_y, n_way=n)
        head = self.model.head
        if self.model.head_name == "protonet":
            from metaformer.heads import ProtoNet

            # ProtoNet has no per-way parameters: a view with n outputs over the same backbone serves any n.
            return ProtoNet(head.backbone, n_way=n).eval().adapt(s_x, s_y, n_way=n)
        return head.adapt(s_x, s_y, n_way=n)


@torch.no_grad()
def feature_source(encoder: nn.Module, source: Any, max_per_class: Optional[int] = None, seed: int = 0,
                   batch_size: int = 64, copies: Optional[Callable[[int, Tensor], Tensor]] = None,
                   progress: bool = False) -> Any:
    """Embed every item of a class source once -> TensorClassSource of features (the frozen-encoder cache).

    ``max_per_class`` keeps a seeded random subset of each class's items (all items when None). ``copies(c, items)``,
    when given, maps class ``c``'s n items to V copies of them stacked copy-major ([V * n, ...]); each cached item is
    then the features [V, d] of its V copies. ``progress`` shows a bar over the classes.
    """
    from metaformer.data.sampler import draw_distinct
    from metaformer.data.source import TensorClassSource

    was_training = encoder.training
    encoder.eval()
    gen = torch.Generator().manual_seed(seed)
    feats, labels = [], []
    classes = range(source.num_classes)
    if progress:
        from tqdm.auto import tqdm

        classes = tqdm(classes, desc="embedding", unit="class")
    try:
        for c in classes:
            size = int(source.sizes_of(torch.tensor([c]))[0])
            if max_per_class is None and size > 1_000_000:
                raise ValueError(f"{getattr(source, 'name', type(source).__name__)} has {size} items per class; "
                                 "pass max_per_class to embed a subset")
            if max_per_class is not None and size > max_per_class:
                # draw_distinct does not materialise a permutation of procedural classes' 2**31 items.
                idx = draw_distinct(gen, size, max_per_class).sort().values
            else:
                idx = torch.arange(size)
            items = source.get_items(torch.tensor([c]), idx[None])
            items = items[0] if isinstance(items, list) else items[0]
            if copies is None:
                feats.append(embed_items(encoder, items, batch_size).float().cpu())
            else:
                f = embed_items(encoder, copies(c, items), batch_size).float().cpu()
                feats.append(f.reshape(-1, len(idx), *f.shape[1:]).transpose(0, 1))  # [n, V, d]
            labels.append(torch.full((len(idx),), c, dtype=torch.int64))
    finally:
        encoder.train(was_training)
        if progress:
            classes.close()
    return TensorClassSource(torch.cat(feats), torch.cat(labels), [source.class_name(c) for c in range(source.num_classes)],
                             name=f"features of {getattr(source, 'name', type(source).__name__)}")


@torch.no_grad()
def evaluate_features(head: nn.Module, source: Any, n_way: int, k_shot: int, q_query: int, episodes: int,
                      seed: int, tasks_per_batch: int = 50) -> dict[str, float]:
    """Accuracy of a feature head on fixed episodes of a feature source: mean, 95% CI half-width, episodes."""
    from metaformer.data.sampler import EpisodeSampler

    was_training = head.training
    head.eval()
    sampler = EpisodeSampler(source, n_way, k_shot, q_query, seed=seed)
    accs = []
    try:
        for start in range(0, episodes, tasks_per_batch):
            batch = sampler.batch(start, min(tasks_per_batch, episodes - start))
            logits = episode_logits(head, batch)
            correct = ((logits.argmax(dim=-1) == batch.query_y) & batch.query_mask).sum(dim=1)
            accs.append(correct.float() / batch.query_mask.sum(dim=1))
    finally:
        head.train(was_training)
    a = torch.cat(accs).double()
    ci = 1.96 * float(a.std(unbiased=True)) / math.sqrt(len(a)) if len(a) > 1 else float("nan")
    return {"accuracy": float(a.mean()), "ci95": ci, "episodes": int(len(a))}
