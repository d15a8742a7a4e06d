"""Finding and replacing the submodules of a model: the one rule for ``skip`` patterns."""
from __future__ import annotations

import fnmatch
from typing import Iterable, List, Tuple

from torch import nn

from .spec import DEFAULT_SKIP


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether module ``name`` matches a pattern: equal to it, ending in ``.pattern``, or an
    ``fnmatch`` glob such as ``"*.mlp.down_proj"``."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p)
               for p in patterns)


def linear_layers(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP
                  ) -> List[Tuple[str, nn.Linear]]:
    """``(name, module)`` of every plain ``nn.Linear`` of ``model`` whose name matches no pattern
    of ``skip`` (``lm_head`` by default) (subclasses such as already-quantized layers are not plain ``nn.Linear``)."""
    skip = tuple(skip)
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and not matches(n, skip)]


def skipped_linear_names(model: nn.Module, skip: Iterable[str]) -> List[str]:
    """Names of the plain ``nn.Linear`` layers that ``skip`` keeps in full precision."""
    skip = tuple(skip)
    return sorted({n for n, m in model.named_modules() if type(m) is nn.Linear and matches(n, skip)})


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (which must exist) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def layer_progress(items, enabled: bool, desc: str):
    """``items`` wrapped in a tqdm progress bar counting layers (plain ``items`` when disabled)."""
    if not enabled:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, unit="layer")
