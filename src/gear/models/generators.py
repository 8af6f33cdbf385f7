"""The generator classes by conditioning: ``GPTConfig.condition`` -> the class that implements it.

Each class registers itself where it is defined (``@register_generator("text")`` on ``TextGPT`` in gpt_t2i.py), so
building or loading a generator from its config (``generator_class``) needs no model module to import another's
class. ``import gear`` imports every generator module, so the registry is complete once gear is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

M = TypeVar("M", bound=type[nn.Module])

GENERATORS: dict[str, type[nn.Module]] = {}


def register_generator(condition: str) -> Callable[[M], M]:
    """Class decorator: the generator class for configs with ``condition`` (one of ``gpt.CONDITIONS``)."""

    def register(cls: M) -> M:
        GENERATORS[condition] = cls
        return cls

    return register


def generator_class(config: Any) -> type[nn.Module]:
    """The class registered for ``config.condition``: GPT for "class", TextGPT for "text"."""
    if config.condition not in GENERATORS:
        raise ValueError(f"no generator class is registered for condition {config.condition!r} "
                         f"(registered: {sorted(GENERATORS)}); import the module that defines it")
    return GENERATORS[config.condition]
