"""The Python API, ``import streamtrainer`` (issue 19): its names, their docstrings, its import cost."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
from typing import Any

import pytest

import streamtrainer


def _public_members(value: Any) -> list[tuple[str, Any]]:
    """The public methods and properties a class defines itself (not those of pydantic or object)."""
    members = []
    for klass in value.__mro__:
        if not klass.__module__.startswith("streamtrainer"):
            continue
        for name, member in vars(klass).items():
            if name.startswith("_") or name in dict(members):
                continue
            function = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
            if inspect.isfunction(function) or isinstance(function, property):
                members.append((name, function))
    return members


def test_every_exported_name_resolves_to_the_object_its_module_defines() -> None:
    assert sorted(streamtrainer.__all__) == sorted(streamtrainer._EXPORTS)
    for name in streamtrainer.__all__:
        module = importlib.import_module(streamtrainer._EXPORTS[name])
        assert getattr(streamtrainer, name) is getattr(module, name), name
        assert name in dir(streamtrainer)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = streamtrainer.Nope  # type: ignore[attr-defined]


def test_every_public_definition_has_a_docstring() -> None:
    """Each exported name, and each public method and property its class defines, says what it does."""
    missing = []
    checked = 0
    assert streamtrainer.__doc__
    for name in streamtrainer.__all__:
        value = getattr(streamtrainer, name)
        checked += 1
        if not (inspect.getdoc(value) or "").strip():
            missing.append(name)
        if inspect.isclass(value):
            for member_name, member in _public_members(value):
                checked += 1
                if not (member.__doc__ or "").strip():
                    missing.append(f"{name}.{member_name}")
    assert not missing, f"no docstring: {', '.join(missing)}"
    assert checked > 60  # the classes' members were walked, not only the names


def test_load_model_is_the_predictor_module_s() -> None:
    from streamtrainer.training import predictor

    assert streamtrainer.load_model is predictor.load_model


def test_importing_streamtrainer_and_its_settings_imports_neither_torch_nor_the_kafka_client() -> None:
    """So that the CLI reports a usage error before torch (1-2 s) is imported."""
    code = (
        "import json, sys, time\n"
        "start = time.perf_counter()\n"
        "import streamtrainer\n"
        "settings = streamtrainer.WorkerSettings(topic='t')\n"
        "took = time.perf_counter() - start\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'kafka': 'confluent_kafka' in sys.modules,"
        " 's': took}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = json.loads(result.stdout)
    assert (loaded["torch"], loaded["kafka"]) == (False, False), loaded
