"""The networks, registered by name: `model.build(name)`; `model.model_names()` lists them."""

from __future__ import annotations

# Importing the network modules registers their nets (each module decorates its classes with register_model).
from model import fast, seed  # noqa: F401
from model._registry import build, count_params, model_names, register_model

__all__ = ["build", "count_params", "model_names", "register_model"]
