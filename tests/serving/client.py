"""A tiny HTTP client for the serve tests (the standard library's: no extra dependency)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any


def get(url: str) -> tuple[int, str]:
    """(status, body) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def post(url: str, body: object) -> tuple[int, dict[str, Any]]:
    """(status, JSON answer) of a POST of ``body`` as JSON."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> float:
    """Seconds until ``condition()`` held; AssertionError after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s}s")
        time.sleep(interval_s)
    return time.monotonic() - started


def served_version(base: str, row: list[float]) -> int:
    """The version that answers a prediction of ``row`` now (0: none)."""
    status, answer = post(f"{base}/predict", {"features": row})
    return int(answer["version"]) if status == 200 else 0


def sample_value(metrics_text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """A sample's value in a Prometheus text exposition (None if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and (
                labels is None or all(sample.labels.get(k) == v for k, v in labels.items())
            ):
                return float(sample.value)
    return None
