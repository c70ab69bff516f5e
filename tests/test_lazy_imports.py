"""The packages metaformer.data / .models / .heads import their modules on first use, and export the same names."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = ["metaformer.data", "metaformer.models", "metaformer.heads"]


def loaded_after(code: str) -> set[str]:
    """The metaformer modules a fresh interpreter has loaded after running ``code``."""
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout
    return {m for m in out.split() if m.startswith("metaformer")}


def test_one_head_loads_only_its_modules() -> None:
    """A MAML run on an MLP loads neither the other heads, the data sources nor the Meta-Transformer/HF modules."""
    loaded = loaded_after("from metaformer.heads import MAML\nfrom metaformer.data import EpisodeBatch\n"
                          "from metaformer.models.backbones import MLP")
    assert {"metaformer.heads.maml", "metaformer.heads.gradient", "metaformer.data.episodes",
            "metaformer.models.backbones"} <= loaded
    never = {"metaformer.heads.transfer", "metaformer.heads.matching", "metaformer.heads.registry",
             "metaformer.heads.probabilistic", "metaformer.data.omniglot", "metaformer.data.hf",
             "metaformer.data.sampler", "metaformer.models.hf_encoder", "metaformer.models.meta_transformer"}
    assert not loaded & never, loaded & never


@pytest.mark.parametrize("package", PACKAGES)
def test_every_export_resolves_to_its_definition(package: str) -> None:
    """Each name in __all__ is reachable, is the object its submodule defines, and shows in dir()."""
    mod = importlib.import_module(package)
    assert mod.__all__, package
    for name in mod.__all__:
        value = getattr(mod, name)  # a name mapped to the wrong submodule raises here
        assert vars(mod)[name] is value  # cached: the next lookup does not go through __getattr__
        assert name in dir(mod)
        if isinstance(value, type) or callable(value):
            assert value.__module__.startswith(package + "."), (name, value.__module__)
    star: dict = {}
    exec(f"from {package} import *", star)  # noqa: S102 - the star import goes through __getattr__ too
    assert set(mod.__all__) <= set(star)


def test_submodules_stay_attributes_and_unknown_names_raise() -> None:
    """``metaformer.data.omniglot`` works without importing it first; a typo raises AttributeError naming it."""
    code = ("import metaformer.data as d\nassert d.omniglot.load_omniglot is d.load_omniglot\n"
            "try:\n    d.EpisodeBatchh\nexcept AttributeError as e:\n    assert 'EpisodeBatchh' in str(e)\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    assert "metaformer.data.omniglot" in loaded_after(code)
