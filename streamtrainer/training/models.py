"""Building a model: a built-in one from the catalog, or a user's factory.

A factory is any callable ``factory(n_features=..., n_outputs=...) -> nn.Module``
named as ``package.module:factory``. Models output raw scores (no sigmoid or
softmax): the loss functions take logits, which is both faster and more stable.
The built-in models are the entries of :mod:`streamtrainer.training.catalog`.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable

import torch
from torch import nn

from streamtrainer.training.catalog import MODELS, offered_models
from streamtrainer.training.exceptions import ModelSpecError

# What a worker may be given as its model in code (Worker(settings, model=...)): a module instance
# (each learner the worker makes trains a copy of it) or a factory as --model names one.
ModelSource = nn.Module | Callable[..., nn.Module]


def n_outputs_for(task: str, n_classes: int | None) -> int:
    """The model's outputs a task needs: ``n_classes`` logits for multiclass, else one score."""
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


def module_name(source: object) -> str:
    """What checkpoints and logs call a model given as an object: ``module:Class`` of an instance,
    ``module:function`` of a factory."""
    target = source if not isinstance(source, nn.Module) and callable(source) else type(source)
    return f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', type(target).__name__)}"


def build_module(source: ModelSource, *, n_features: int, n_outputs: int, seed: int = 0) -> nn.Module:
    """A fresh module from a model given as an object: a deep copy of an instance (its parameters as
    given), or a factory called as ``factory(n_features=..., n_outputs=...)`` under ``seed`` in
    float32, as ``build_model`` calls one named by ``--model``."""
    if isinstance(source, nn.Module):
        return copy.deepcopy(source)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = source(n_features=n_features, n_outputs=n_outputs)
    except TypeError as error:
        raise ModelSpecError(
            f"factory {module_name(source)!r} must accept n_features= and n_outputs= keywords ({error})"
        ) from None
    finally:
        torch.random.set_rng_state(generator_state)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"factory {module_name(source)!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model.to(torch.float32)


def check_module(module: object, *, n_features: int, n_outputs: int, task: str) -> None:
    """Raise :class:`ModelSpecError` unless ``module`` is an ``nn.Module`` with parameters that maps
    ``(n, n_features)`` rows to ``n_outputs`` scores each (one forward pass on zeros, in eval mode,
    without gradients; the module's mode is restored)."""
    if not isinstance(module, nn.Module):
        raise ModelSpecError(f"expected a torch.nn.Module, got {type(module).__name__}")
    parameter = next(module.parameters(), None)
    if parameter is None:
        raise ModelSpecError(f"{type(module).__name__} has no parameters to learn")
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            outputs = module(torch.zeros(2, n_features, dtype=parameter.dtype, device=parameter.device))
    except Exception as error:  # noqa: BLE001 - whatever a user's forward raises, said in one line
        raise ModelSpecError(
            f"{type(module).__name__} failed on a batch of shape (2, {n_features}): "
            f"{type(error).__name__}: {error}"
        ) from None
    finally:
        module.train(training)
    if not isinstance(outputs, torch.Tensor):
        raise ModelSpecError(f"{type(module).__name__} returned {type(outputs).__name__}, not a tensor")
    expected = (2, n_outputs)
    fits = tuple(outputs.shape) == expected or (n_outputs == 1 and tuple(outputs.shape) == (2,))
    if not fits:
        raise ModelSpecError(
            f"{type(module).__name__} maps (2, {n_features}) to {tuple(outputs.shape)}; a {task} model "
            f"must give {expected} (raw scores: no sigmoid or softmax)"
        )
