"""Loads the compiled extension metaformer._C once and tells which backend inner_update runs on."""

from __future__ import annotations

import os
import warnings
from functools import lru_cache
from typing import Optional


@lru_cache(maxsize=1)
def load_extension() -> Optional[object]:
    """Import metaformer._C (which registers torch.ops.metaformer.*) or return None when it is not built."""
    if os.environ.get("METAFORMER_BACKEND", "").strip().lower() == "reference":
        return None
    try:
        from metaformer import _C  # noqa: F401  (importing registers the TORCH_LIBRARY ops)
    except ImportError as exc:
        if os.environ.get("METAFORMER_BACKEND", "").strip().lower() == "extension":
            raise ImportError(
                "METAFORMER_BACKEND=extension but metaformer._C could not be imported; rebuild with "
                "`pip install --no-build-isolation -e .`"
            ) from exc
        warnings.warn(
            f"metaformer._C is not built ({exc}); inner_update runs on the pure-PyTorch reference. "
            "Build it with `pip install --no-build-isolation -e .`",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return _C


def backend() -> str:
    """'extension' when the fused C++/CUDA op is active, else 'reference' (pure PyTorch)."""
    return "extension" if load_extension() is not None else "reference"


def extension_has_cuda() -> bool:
    """Whether the loaded extension was compiled with its CUDA kernels."""
    ext = load_extension()
    return bool(ext is not None and ext.built_with_cuda())
