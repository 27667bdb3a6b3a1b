"""The model registry: a leaf module (it imports no network), as in timm's `_registry.py`.

Networks register themselves with the `register_model` decorator where they are defined; `model/__init__.py` imports
the network modules once, so every registered name is known after `import model`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

Factory = Callable[..., nn.Module]
_REGISTRY: dict[str, Factory] = {}


def register_model(name: str) -> Callable[[Factory], Factory]:
    """Decorator: register a network class or factory under `name`.

    Raises ValueError if `name` is already taken (a second network under the same name would silently replace the
    first, and runs that name it would train something else).
    """

    def add(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(
                f"model name {name!r} is registered twice ({_REGISTRY[name].__qualname__} and {factory.__qualname__})"
            )
        _REGISTRY[name] = factory
        return factory

    return add


def model_names() -> tuple[str, ...]:
    """Every registered name, in registration order (read at call time, so late registrations are included)."""
    return tuple(_REGISTRY)


def build(name: str, **kwargs: object) -> nn.Module:
    """A new network registered as `name`, built with `kwargs`. Raises ValueError for an unknown name."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def count_params(module: nn.Module) -> int:
    """Trainable parameters of `module` (the number the < 200,000 rule is about)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
