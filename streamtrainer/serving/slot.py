"""The served model: one reference, swapped atomically when the gate lets a newer version in."""

from __future__ import annotations

import logging
import threading
import time

from streamtrainer.serving.gate import PromotionGate, Verdict
from streamtrainer.serving.metrics import ServeMetrics
from streamtrainer.training.predictor import Predictor

logger = logging.getLogger(__name__)


class ModelSlot:
    """Holds the served :class:`Predictor`; sources :meth:`offer` each newer version to it.

    A request reads :attr:`current` once and predicts with that predictor to the end: a swap (one
    reference assignment) never changes the model under a request in flight, and the old model lives
    on until its last request finishes.
    """

    def __init__(self, gate: PromotionGate, metrics: ServeMetrics) -> None:
        self.gate = gate
        self.metrics = metrics
        self._current: Predictor | None = None
        self._offers = threading.Lock()  # one offer judged at a time (two sources never race)
        self.swapped_at = 0.0  # time.monotonic() of the last swap
        self.versions_seen = 0  # the newest version offered (served or gated out)

    @property
    def current(self) -> Predictor | None:
        """The served predictor (None until the first version loads)."""
        return self._current

    def offer(self, candidate: Predictor) -> Verdict | None:
        """Judge ``candidate`` and serve it if it passes; None when it is not newer than the served one."""
        with self._offers:
            served = self._current
            self.versions_seen = max(self.versions_seen, candidate.version)
            if served is not None and candidate.version <= served.version:
                return None
            verdict = self.gate.judge(candidate, served)
            if not verdict.passed:
                self.metrics.gated.labels(verdict.reason).inc()
                logger.warning(
                    "version %d gated out, still serving %d: %s",
                    candidate.version,
                    served.version if served is not None else 0,
                    verdict.explanation,
                )
                return verdict
            self._current = candidate
            self.swapped_at = time.monotonic()
            self.metrics.swaps.inc()
            self.metrics.model_version.set(candidate.version)
            self.metrics.last_swap.set(time.time())
            logger.info(
                "serving %s version %d (%s)",
                candidate.name or "model",
                candidate.version,
                verdict.explanation,
            )
            return verdict
