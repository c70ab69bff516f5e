"""Command lines quoted as advice (config headers, script docstrings) still parse and build: each goes through the
CLI's argument parser, the config loader and the model builder (no training). On the sinusoid family, advice for a
gradient head uses the results suite's inner_lr (the heads' classification default diverges there)."""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from metaformer.cli import _parser
from training.config import load_config
from training.registry import build_model

REPO = Path(__file__).resolve().parents[1]


def _commands(lines: list[str]) -> list[str]:
    """`metaformer ...` command lines among text lines (backslash continuations joined)."""
    out: list[str] = []
    pending: str | None = None
    for line in lines:
        text = line.strip()
        if pending is None and not text.startswith("metaformer "):
            continue
        pending = text if pending is None else f"{pending} {text}"
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
        else:
            out.append(pending)
            pending = None
    return out


def _quoted(text: str, config: str | None = None) -> list[str]:
    """Commands with a config quoted inline (`metaformer train --config ...`, also in double backticks); in a config's
    header a quoted `--set ...` fragment is advice for that config."""
    out = []
    for span in re.findall(r"`+([^`]+)`+", text):
        span = " ".join(span.split())
        if span.startswith("metaformer ") and " --config " in span:  # not a bare name, e.g. `metaformer train`
            out.append(span)
        elif config is not None and span.startswith("--set "):
            out.append(f"metaformer train --config training/configs/{config} {span}")
    return out


def _advice() -> list[tuple[str, str]]:
    """(where, command) for every command in the configs' comments and the scripts' module docstrings."""
    found = []
    for path in sorted((REPO / "training" / "configs").glob("*.yaml")):
        comments = [line.split("#", 1)[1] for line in path.read_text().splitlines() if line.lstrip().startswith("#")]
        found += [(path.name, cmd) for cmd in _commands(comments) + _quoted("\n".join(comments), path.name)]
    for path in sorted((REPO / "scripts").glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        found += [(f"scripts/{path.name}", cmd) for cmd in _commands(doc.splitlines()) + _quoted(doc)]
    return found


ADVICE = _advice()


def test_the_advice_is_found() -> None:
    where = {w for w, _ in ADVICE}
    assert {"sinusoid.yaml", "omniglot_20w1s_meta_transformer_frozen.yaml", "scripts/plot_probmaml_sinusoid.py"} <= where


@functools.cache
def _sinusoid_overrides() -> dict[str, tuple[str, ...]]:
    """scripts/benchmark.py's per-head settings on the sinusoid family (the results suite's)."""
    spec = importlib.util.spec_from_file_location("metaformer_advice_benchmark", REPO / "scripts" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is created
    spec.loader.exec_module(mod)
    return mod.SINUSOID_METHOD_OVERRIDES


@pytest.mark.parametrize("where,command", ADVICE, ids=[f"{w}:{i}" for i, (w, _) in enumerate(ADVICE)])
def test_quoted_command_parses_and_builds(where: str, command: str) -> None:
    argv = shlex.split(command, comments=True)
    assert argv[0] == "metaformer", command
    args = _parser().parse_args(argv[1:])
    if args.command != "train":
        return
    cfg = load_config(REPO / args.config, args.set)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
    if cfg.data.source == "sinusoid" and cfg.model.name in _sinusoid_overrides():
        suite = load_config(REPO / args.config, list(_sinusoid_overrides()[cfg.model.name]))
        assert cfg.model.options.get("inner_lr") == suite.model.options["inner_lr"], (where, command)
