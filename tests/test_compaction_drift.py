"""Evidence that compaction pays: a drifting stream learned online, with and without compaction.

The worker's loop, in process and without a broker: strict test-then-train
(``learn_many``) per polled chunk of 500 records, the chunk appended to a
compaction store, and every ``EVERY`` records a few mini-batch epochs over the
last ``WINDOW`` records. The prequential loss (each record's loss before the
model learned from it) is compared with the same loop without compaction.

What to expect: online SGD at this learning rate already adapts to the
drift within ~500-1000 records, and most of its loss above the best linear
fit is the noise of per-record steps, which the next online steps bring
back within a few hundred records of every compaction. So the gain is small
— about 0.5% of the mean loss (0.237 -> 0.236; the best logistic models
fitted in hindsight on each concept reach 0.203) — but it holds on every
seed, before and after the drift. A window reaching back across the drift
costs a little just after it (the replay pulls towards the old concept);
windows of the records since the previous compaction keep that cost small.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamtrainer.producer.synthetic import SyntheticSpec, generate_arrays
from streamtrainer.training import LearnerConfig, OnlineLearner, kernels
from streamtrainer.training.compaction import CompactionStore, CompactionTrigger, train_epochs

SEEDS = (0, 1, 2)
RECORDS, DRIFT_AT, CHUNK = 40_000, 20_250, 500  # the drift falls inside a poll chunk
N_FEATURES, NOISE, LR = 32, 0.02, 0.05
# The figures the worker's defaults come from (compaction_every_records, _window, _epochs, _batch_size).
EVERY, WINDOW, EPOCHS, BATCH = 2000, 2000, 3, 8


def prequential_losses(seed: int, directory: Path, *, compact: bool) -> np.ndarray:
    spec = SyntheticSpec(
        task="binary", n_features=N_FEATURES, noise=NOISE, seed=seed, drift="abrupt", drift_at=DRIFT_AT
    )
    features, labels = generate_arrays(spec, RECORDS)
    config = LearnerConfig(model="logistic", task="binary", optimizer="sgd", lr=LR, seed=seed)
    learner = OnlineLearner(config, N_FEATURES)
    # The same (compiled) path from the first record on, whatever the machine's compile time.
    kernels.wait_until_ready(learner.model, learner.optimizer, loss="bce", task="binary", timeout_s=120)
    trigger = CompactionTrigger(every_records=EVERY, every_seconds=None)
    losses = []
    with CompactionStore(directory, memory_records=5_000, retain_records=WINDOW) as store:
        for start in range(0, RECORDS, CHUNK):
            x, y = features[start : start + CHUNK], labels[start : start + CHUNK]
            losses.append(learner.learn_many(x, y).losses)
            if not compact:
                continue
            offsets = np.arange(start, start + len(y))
            store.append(x, y, (offsets % 3).astype(np.int32), offsets // 3)
            trigger.observe(len(y))
            if trigger.due() is not None:
                window = store.window(last=WINDOW)
                assert window.count == min(WINDOW, start + len(y))
                train_epochs(learner, window, epochs=EPOCHS, batch_size=BATCH, seed=seed * RECORDS + start)
                trigger.reset()
    return np.concatenate(losses)


@pytest.mark.parametrize("seed", SEEDS)
def test_compaction_lowers_the_prequential_loss_of_a_drifting_stream(seed: int, tmp_path: Path) -> None:
    without = prequential_losses(seed, tmp_path / "without", compact=False)
    with_ = prequential_losses(seed, tmp_path / "with", compact=True)
    whole = (float(without.mean()), float(with_.mean()))
    post = (float(without[DRIFT_AT:].mean()), float(with_[DRIFT_AT:].mean()))
    print(
        f"seed {seed}: mean prequential loss without/with compaction {whole[0]:.4f} / {whole[1]:.4f} "
        f"({(whole[0] - whole[1]) / whole[0]:+.2%}); after the drift {post[0]:.4f} / {post[1]:.4f} "
        f"({(post[0] - post[1]) / post[0]:+.2%})"
    )
    # Seen: gains of 0.0012-0.0014 overall and 0.0006-0.0015 after the drift; the margins are far
    # above what float32 rounding moves (the compiled and autograd paths agree to ~1e-7 per record).
    assert whole[1] < whole[0] - 0.0008
    assert post[1] < post[0] - 0.0003
