"""Building a model: a built-in one from the catalog, or a user's factory.

A factory is any callable ``factory(n_features=..., n_outputs=...) -> nn.Module``
named as ``package.module:factory``. Models output raw scores (no sigmoid or
softmax): the loss functions take logits, which is both faster and more stable.
The built-in models are the entries of :mod:`streamtrainer.training.catalog`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from streamtrainer.training.catalog import MODELS, offered_models
from streamtrainer.training.exceptions import ModelSpecError


def n_outputs_for(task: str, n_classes: int | None) -> int:
    if task == "multiclass":
        if n_classes is None or n_classes < 2:
            raise ModelSpecError("a multiclass task needs n_classes >= 2")
        return n_classes
    return 1


def build_model(
    name: str,
    *,
    n_features: int,
    n_outputs: int,
    hidden: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Build ``name`` with parameters initialised from ``seed`` (same seed, same model)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = _construct(name, n_features=n_features, n_outputs=n_outputs, hidden=hidden)
    finally:
        torch.random.set_rng_state(generator_state)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    if name == "audit":
        return model  # float64 by construction
    return model.to(dtype)


def _construct(name: str, *, n_features: int, n_outputs: int, hidden: int) -> nn.Module:
    entry = MODELS.get(name)
    if entry is not None:
        return entry.builder(n_features, n_outputs, hidden)
    factory = load_factory(name)
    try:
        return factory(n_features=n_features, n_outputs=n_outputs)
    except TypeError as error:
        raise ModelSpecError(
            f"factory {name!r} must accept n_features= and n_outputs= keywords ({error})"
        ) from None


def load_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ModelSpecError(
            f"model {spec!r} is neither built in ({', '.join(offered_models())}) nor package.module:factory"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelSpecError(f"cannot import {module_name!r} for model {spec!r}: {error}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ModelSpecError(f"{module_name!r} has no callable {attribute!r}")
    return factory  # type: ignore[no-any-return]
