"""The networks, registered by name: `model.build(name)`; `model.NAMES` lists them."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from model.seed import SeedNet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable:
    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = factory
        return factory

    return add


register("seed")(SeedNet)

from model import fast  # noqa: E402,F401  (registers its nets)

NAMES: tuple[str, ...] = tuple(_REGISTRY)


def build(name: str, **kwargs: object) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
