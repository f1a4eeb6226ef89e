"""streamtrainer serve from a checkpoint directory: version v, then v+1 within a few seconds with the
learner's own predictions, a gated-out version not served, and the command itself."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from streamtrainer.serving.server import ModelServer
from streamtrainer.settings import ServeSettings
from streamtrainer.training.predictor import Predictor
from tests.serving.client import get, post, sample_value, served_version, wait_for
from tests.training.model_fixtures import save, train

# How long a swap may take: the directory is polled every 0.1 s here (1 s by default).
SWAP_LIMIT_S = 5.0


def _predictions(base: str, rows: np.ndarray) -> tuple[int, np.ndarray]:
    status, answer = post(f"{base}/predict", {"instances": rows.tolist()})
    assert status == 200, answer
    return int(answer["version"]), np.asarray(answer["predictions"], dtype=np.float64)


def test_serve_swaps_to_each_better_version_and_keeps_a_worse_one_out(tmp_path: Path) -> None:
    first = train("linear", 300)
    better = train("linear", 900)
    worse = train("linear", 900, noise=True)  # labels shuffled: its window rmse is far higher
    assert worse.measured.window_values()["rmse"] > 1.5 * better.measured.window_values()["rmse"]
    x = first.held_out.astype(np.float32)
    # The learner's own predictions, as JSON carries them (float32 features round-trip exactly).
    row = [float(v) for v in x[0]]
    settings = ServeSettings(checkpoint_dir=tmp_path, port=0, poll_interval_s=0.1)
    with ModelServer(settings) as server:
        base = server.url
        assert get(f"{base}/healthz") == (200, "ok\n")
        assert get(f"{base}/ready")[0] == 503
        assert post(f"{base}/predict", {"features": row})[0] == 503

        save(first, tmp_path)
        wait_for(lambda: get(f"{base}/ready")[0] == 200, SWAP_LIMIT_S)
        version, got = _predictions(base, x)
        assert version == 1
        np.testing.assert_array_equal(got, first.learner.predict_many(x))

        save(better, tmp_path)
        swap_s = wait_for(lambda: served_version(base, row) == 2, SWAP_LIMIT_S)
        print(f"checkpoint dir: version 2 served {swap_s:.3f}s after its checkpoint was written")
        version, got = _predictions(base, x)
        assert version == 2
        np.testing.assert_array_equal(got, better.learner.predict_many(x))

        save(worse, tmp_path)
        wait_for(lambda: server.slot.versions_seen == 3, SWAP_LIMIT_S)
        assert served_version(base, row) == 2
        metrics = get(f"{base}/metrics")[1]
        assert sample_value(metrics, "streamtrainer_serve_versions_gated_total", {"reason": "worse"}) == 1
        assert sample_value(metrics, "streamtrainer_serve_model_version") == 2
        assert sample_value(metrics, "streamtrainer_serve_swaps_total") == 2

        # A newer good version is compared with the served one (2), not the gated one, and served.
        save(train("linear", 1000), tmp_path)
        wait_for(lambda: served_version(base, row) == 4, SWAP_LIMIT_S)
        metrics = get(f"{base}/metrics")[1]
        assert (
            sample_value(metrics, "streamtrainer_serve_requests_total", {"path": "/predict", "status": "503"})
            == 1
        )
        assert (sample_value(metrics, "streamtrainer_serve_request_latency_seconds_count") or 0) >= 5


def test_predict_answers_probabilities_and_refuses_bad_bodies_in_one_line(tmp_path: Path) -> None:
    trained = train("softmax", 400)
    save(trained, tmp_path)
    x = trained.held_out[:5]
    with ModelServer(ServeSettings(checkpoint_dir=tmp_path, port=0, poll_interval_s=0.1)) as server:
        base = server.url
        wait_for(lambda: get(f"{base}/ready")[0] == 200, SWAP_LIMIT_S)
        status, answer = post(f"{base}/predict", {"instances": x.tolist()})
        assert status == 200
        assert answer["predictions"] == trained.learner.predict_many(x).tolist()
        probabilities = np.asarray(answer["probabilities"])
        assert probabilities.shape == (5, 3)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-12)
        status, one = post(f"{base}/predict", {"features": x[0].tolist()})
        assert status == 200 and one["prediction"] == answer["predictions"][0]
        for body, message in [
            (b"{not json", "not JSON"),
            ({"rows": []}, '{"features"'),
            ({"features": [1.0, 2.0]}, "takes 6 features, not 2"),
            ({"features": ["a"] * 6}, "numbers"),
            ({"instances": []}, "non-empty"),
        ]:
            status, error = post(f"{base}/predict", body)
            assert status == 400, (body, error)
            assert message in error["error"]


def test_the_serve_command_serves_until_sigterm(tmp_path: Path) -> None:
    trained = train("logistic", 300)
    save(trained, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTRAINER_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "streamtrainer", "serve", "--checkpoint-dir", str(tmp_path), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        found = re.search(r"serving on (http://\S+)", line)
        assert found, line
        base = found.group(1)
        wait_for(lambda: get(f"{base}/ready")[0] == 200, 30.0)
        status, answer = post(f"{base}/predict", {"instances": trained.held_out[:3].tolist()})
        assert status == 200
        assert answer["predictions"] == trained.learner.predict_many(trained.held_out[:3]).tolist()
        assert np.asarray(answer["probabilities"]).shape == (3, 2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


class _SlowPredictor(Predictor):
    """A predictor that takes 0.5 s per request: a request still in flight when a swap happens."""

    def predict_many(self, features: npt.ArrayLike) -> npt.NDArray[np.float64]:
        time.sleep(0.5)
        return super().predict_many(features)


def test_a_request_in_flight_during_a_swap_finishes_on_the_old_version(tmp_path: Path) -> None:
    trained = train("linear", 200)
    checkpoint = save(trained, tmp_path / "ckpt")
    old = _SlowPredictor.from_state(checkpoint.tensors, checkpoint.metadata, version=1)
    new = Predictor.from_state(checkpoint.tensors, checkpoint.metadata, version=2)
    settings = ServeSettings(checkpoint_dir=tmp_path / "nothing-here", port=0, gate_metric="none")
    with ModelServer(settings) as server:
        server.slot.offer(old)
        row = trained.held_out[0].tolist()
        answers: list[dict[str, object]] = []
        in_flight = threading.Thread(
            target=lambda: answers.append(post(f"{server.url}/predict", {"features": row})[1])
        )
        in_flight.start()
        time.sleep(0.2)  # the request holds version 1 now
        assert server.slot.offer(new) is not None and server.slot.current is new
        assert served_version(server.url, row) == 2  # a new request: the new version at once
        in_flight.join(10)
        assert answers and answers[0]["version"] == 1
