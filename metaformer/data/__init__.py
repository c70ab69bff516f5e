"""Episodic data: episodes, samplers, class sources (Omniglot, image folders, text, HF datasets) and task
families. Each module is imported on first use (see metaformer._lazy)."""

from typing import TYPE_CHECKING

from metaformer._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "augment": ["AffineAugment", "AugmentedEpisodes", "random_affine"],
    "episodes": ["Episode", "EpisodeBatch"],
    "glyphs": ["GlyphFamily"],
    "hf": ["hf_class_source", "load_hf_source"],
    "images": ["image_folder_source", "lake_runs"],
    "loading": ["EpisodeStream", "episode_loader"],
    "omniglot": ["default_cache_dir", "load_omniglot", "omniglot_alphabet_split", "omniglot_vinyals_split",
                 "resolve_data_root"],
    "sampler": ["EpisodeSampler"],
    "sinusoid": ["SinusoidFamily"],
    "source": ["ClassSource", "ClassSubset", "MirroredClasses", "RotatedClasses", "TensorClassSource", "TextClassSource",
               "split_by_class", "split_by_group", "with_rotations"],
    "text": ["clinc150_source", "jsonl_text_source"],
})

if TYPE_CHECKING:  # static tools see the real names
    from metaformer.data.augment import AffineAugment, AugmentedEpisodes, random_affine
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
        MirroredClasses,
        RotatedClasses,
        TensorClassSource,
        TextClassSource,
        split_by_class,
        split_by_group,
        with_rotations,
    )
    from metaformer.data.text import clinc150_source, jsonl_text_source
