"""The HTTP endpoints of ``streamtrainer serve`` (a Starlette app; uvicorn runs it).

- ``POST /predict``: ``{"features": [x1, ...]}`` (one row) answers ``{"prediction": p}``;
  ``{"instances": [[x1, ...], ...]}`` answers ``{"predictions": [p, ...]}``. A classification model
  adds its class probabilities (``"probabilities"``: one list per row, P(0), P(1)... ). Every answer
  names the ``model`` and the ``version`` that made it. 400 for a body that is not one of these (one
  line in ``"error"``), 503 while no version is loaded.
- ``GET /healthz``: 200 while the process is up.
- ``GET /ready``: 200 once a version is served, 503 before.
- ``GET /metrics``: the server's own Prometheus registry (:mod:`.metrics`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from streamtrainer.serving.metrics import ServeMetrics
from streamtrainer.serving.slot import ModelSlot
from streamtrainer.training.predictor import Predictor

logger = logging.getLogger(__name__)

PREDICT_PATH = "/predict"
# A request body above this is refused (413): ~100,000 rows of 8 features as JSON.
MAX_BODY_BYTES = 16 * 1024 * 1024


class _BadRequestError(ValueError):
    """A body /predict cannot take (the message is the answer's one line)."""


def _json(content: object, status: int = 200) -> Response:
    # orjson: NaN and inf become null (JSON has neither).
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, media_type="application/json"
    )


def _rows(body: Any) -> tuple[np.ndarray[Any, np.dtype[np.float32]], bool]:
    """The feature rows of a /predict body, and whether it was one row (``features``)."""
    if not isinstance(body, dict) or ("features" in body) == ("instances" in body):
        raise _BadRequestError('the body must be {"features": [...]} or {"instances": [[...], ...]}')
    single = "features" in body
    values = body["features"] if single else body["instances"]
    try:
        rows = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise _BadRequestError("features must be numbers") from None
    if single:
        if rows.ndim != 1:
            raise _BadRequestError("features must be a list of numbers (one row)")
        rows = rows.reshape(1, -1)
    elif rows.ndim != 2 or rows.shape[0] == 0:
        raise _BadRequestError("instances must be a non-empty list of rows of numbers")
    return rows, single


def _answer(
    predictor: Predictor, rows: np.ndarray[Any, np.dtype[np.float32]], single: bool
) -> dict[str, Any]:
    if rows.shape[1] != predictor.n_features:
        raise _BadRequestError(f"the model takes {predictor.n_features} features, not {rows.shape[1]}")
    predictions = predictor.predict_many(rows)
    answer: dict[str, Any] = {"model": predictor.name, "version": predictor.version}
    probabilities = predictor.predict_proba_many(rows) if predictor.task != "regression" else None
    if single:
        answer["prediction"] = float(predictions[0])
        if probabilities is not None:
            answer["probabilities"] = probabilities[0]
    else:
        answer["predictions"] = predictions
        if probabilities is not None:
            answer["probabilities"] = probabilities
    return answer


def build_app(slot: ModelSlot, metrics: ServeMetrics) -> Starlette:
    """The Starlette app answering from ``slot``'s current version."""

    async def predict(request: Request) -> Response:
        started = time.perf_counter()
        status = 200
        try:
            # The version is read once: a swap meanwhile does not change the model of this request.
            predictor = slot.current
            if predictor is None:
                status = 503
                return _json({"error": "no model version loaded yet"}, status)
            body_bytes = await request.body()
            if len(body_bytes) > MAX_BODY_BYTES:
                status = 413
                return _json({"error": f"the body is over {MAX_BODY_BYTES} bytes"}, status)
            try:
                rows, single = _rows(orjson.loads(body_bytes))
                answer = await run_in_threadpool(_answer, predictor, rows, single)
            except orjson.JSONDecodeError as error:
                status = 400
                return _json({"error": f"the body is not JSON: {error}"}, status)
            except _BadRequestError as error:
                status = 400
                return _json({"error": str(error)}, status)
            metrics.predictions.inc(rows.shape[0])
            return _json(answer)
        finally:
            metrics.requests.labels(PREDICT_PATH, str(status)).inc()
            metrics.latency.observe(time.perf_counter() - started)

    async def healthz(request: Request) -> Response:
        metrics.requests.labels("/healthz", "200").inc()
        return PlainTextResponse("ok\n")

    async def ready(request: Request) -> Response:
        predictor = slot.current
        if predictor is None:
            metrics.requests.labels("/ready", "503").inc()
            return PlainTextResponse("no model version loaded yet\n", 503)
        metrics.requests.labels("/ready", "200").inc()
        return PlainTextResponse(f"serving {predictor.name or 'model'} version {predictor.version}\n")

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route(PREDICT_PATH, predict, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
        ]
    )
