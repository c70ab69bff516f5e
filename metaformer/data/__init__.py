"""Episodic data: episodes, samplers, class sources (Omniglot, image folders, text, HF datasets) and task families."""

from metaformer.data.episodes import Episode, EpisodeBatch
from metaformer.data.glyphs import GlyphFamily
from metaformer.data.hf import hf_class_source, load_hf_source
from metaformer.data.images import image_folder_source, lake_runs
from metaformer.data.loading import EpisodeStream, episode_loader
from metaformer.data.omniglot import (
    default_cache_dir,
    load_omniglot,
    omniglot_alphabet_split,
    omniglot_vinyals_split,
    resolve_data_root,
)
from metaformer.data.sampler import EpisodeSampler
from metaformer.data.sinusoid import SinusoidFamily
from metaformer.data.source import (
    ClassSource,
    ClassSubset,
    RotatedClasses,
    TensorClassSource,
    TextClassSource,
    split_by_class,
    split_by_group,
    with_rotations,
)
from metaformer.data.text import clinc150_source, jsonl_text_source

__all__ = [
    "Episode",
    "EpisodeBatch",
    "EpisodeSampler",
    "GlyphFamily",
    "SinusoidFamily",
    "EpisodeStream",
    "episode_loader",
    "ClassSource",
    "ClassSubset",
    "RotatedClasses",
    "TensorClassSource",
    "TextClassSource",
    "split_by_class",
    "split_by_group",
    "with_rotations",
    "load_omniglot",
    "omniglot_alphabet_split",
    "omniglot_vinyals_split",
    "default_cache_dir",
    "resolve_data_root",
    "image_folder_source",
    "lake_runs",
    "jsonl_text_source",
    "clinc150_source",
    "hf_class_source",
    "load_hf_source",
]
