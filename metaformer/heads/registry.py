"""``build_head(name, backbone, **kw)``: every head by name."""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any, Callable, Optional, Union

from torch import nn

from .base import FewShotHead
from .lstm import LSTMMetaLearner
from .maml import ANIL, MAML, MetaSGD
from .matching import MatchingNet
from .probabilistic import ProbabilisticMAML
from .protonet import ProtoNet
from .reptile import Reptile
from .transfer import BaselinePlusPlus, TransferBaseline


def _fomaml(backbone: nn.Module, **kw: Any) -> FewShotHead:
    """First-order MAML."""
    if kw.pop("first_order", True) is not True:
        raise ValueError("'fomaml' is first order by definition; use build_head('maml', ...) for second order")
    return MAML(backbone, first_order=True, **kw)


HEADS: dict[str, Callable[..., FewShotHead]] = {
    "maml": MAML,
    "fomaml": _fomaml,
    "anil": ANIL,
    "metasgd": MetaSGD,
    "reptile": Reptile,
    "lstm": LSTMMetaLearner,
    "protonet": ProtoNet,
    "matchingnet": MatchingNet,
    "baseline": TransferBaseline,
    "baselinepp": BaselinePlusPlus,
    "probmaml": ProbabilisticMAML,
}

# Other spellings of a head (after lower-casing and dropping "-" and "_"); not separate heads.
ALIASES: dict[str, str] = {"probabilisticmaml": "probmaml", "platipus": "probmaml"}


# Keyword arguments a head passes to its base class itself: not options of that head, although the base takes them.
_FIXED_BY: dict[type, frozenset[str]] = {MAML: frozenset({"adapt"}), ANIL: frozenset({"adapt"})}
# Heads that are functions forwarding to a class: that class's options are theirs.
_OPTIONS_OF: dict[Callable[..., FewShotHead], type] = {_fomaml: MAML}
# The values a config (YAML) gives; other values (numpy scalars, tensors) go to the constructor unchecked.
_CONFIG_TYPES = (str, bool, int, float, list, dict, type(None))


def head_options(name: str) -> dict[str, inspect.Parameter]:
    """The keyword options head `name` accepts besides its backbone, following ``**kw`` into its base classes."""
    key = _key(name)
    target: Any = _OPTIONS_OF.get(HEADS[key], HEADS[key])
    fixed: set[str] = set()
    options: dict[str, inspect.Parameter] = {}
    for owner in target.__mro__:
        init = owner.__dict__.get("__init__")
        if init is None:
            continue
        params = [p for p in inspect.signature(init).parameters.values() if p.name not in ("self", "backbone")]
        try:
            hints = typing.get_type_hints(init)
        except (NameError, TypeError):  # an annotation that does not resolve: no type check for that constructor
            hints = {}
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in fixed:
                options.setdefault(p.name, p.replace(annotation=hints.get(p.name, inspect.Parameter.empty)))
        fixed |= _FIXED_BY.get(owner, frozenset())
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break  # the rest of the chain only sees what this constructor passes on
    return options


def _allowed_types(annotation: Any) -> Optional[tuple[type, ...]]:
    """The config value types an annotation admits (float admits int), or None when it is not a plain scalar."""
    if annotation is type(None):
        return (type(None),)
    if annotation is float:
        return (int, float)
    if annotation in (bool, int, str):
        return (annotation,)
    if typing.get_origin(annotation) in (Union, types.UnionType):
        parts = [_allowed_types(a) for a in typing.get_args(annotation)]
        return None if any(p is None for p in parts) else tuple(t for p in parts if p for t in p)
    return None


def _type_name(types_: tuple[type, ...]) -> str:
    """How an error message says which values are allowed ("an int or null")."""
    names = {bool: "true or false", int: "an int", float: "a number", str: "a string", type(None): "null"}
    return " or ".join(names[t] for t in types_ if not (t is int and float in types_))


def _lossless(value: Any, allowed: tuple[type, ...]) -> Any:
    """``value`` converted where the constructors always converted it without loss, else unchanged: a number
    written as a string (YAML 1.1 reads ``1e-3`` without a dot as the string '1e-3') for a float option, 0 / 1 for a
    bool one. Configs of earlier versions hold such values, and their runs must still build."""
    if float in allowed and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if bool in allowed and not isinstance(value, bool) and isinstance(value, int) and value in (0, 1):
        return bool(value)
    return value


def check_head_options(name: str, kw: dict[str, Any]) -> dict[str, Any]:
    """Raise ValueError naming an option `name` does not accept (with the accepted ones) or a value of the wrong type;
    returns the options with numbers written as strings and 0 / 1 flags converted (see _lossless)."""
    options = head_options(name)
    unknown = sorted(set(kw) - set(options))
    if unknown:
        raise ValueError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for head "
                         f"{name!r}; it accepts: {', '.join(sorted(options))}")
    out = dict(kw)
    for option, value in kw.items():
        allowed = _allowed_types(options[option].annotation)
        if allowed is None or not isinstance(value, _CONFIG_TYPES):
            continue
        value = out[option] = _lossless(value, allowed)
        # bool is an int subclass, but true/false for a count or a rate is a mistake
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ValueError(f"option {option!r} of head {name!r} must be {_type_name(allowed)}, got {value!r}")
    return out


def _key(name: str) -> str:
    """The HEADS key of a head name or alias; ValueError naming the heads for an unknown one."""
    key = name.lower().replace("-", "").replace("_", "")
    key = ALIASES.get(key, key)
    if key not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {sorted(HEADS)}")
    return key


def head_class(name: str) -> type[FewShotHead]:
    """The class a head name (or alias) builds, e.g. MAML for "fomaml"; ValueError for an unknown name."""
    key = _key(name)
    return _OPTIONS_OF.get(HEADS[key], HEADS[key])


def build_head(name: str, backbone: nn.Module, **kw: Any) -> FewShotHead:
    """Build a head by name ("maml", "fomaml", "anil", "metasgd", "reptile", "lstm", "protonet", "matchingnet",
    "probmaml" (aliases "probabilistic_maml", "platipus"), "baseline", "baselinepp" (transfer baselines of
    Chen et al. 2019: supervised pre-training, a new linear / cosine classifier per task))."""
    key = _key(name)
    kw = check_head_options(name, kw)  # before the constructor: its TypeError would not say which options exist
    try:
        return HEADS[key](backbone, **kw)
    except TypeError as e:
        raise ValueError(f"bad arguments for head {name!r}: {sorted(kw)} ({e})") from e
