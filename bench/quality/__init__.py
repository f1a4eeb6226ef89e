"""The quality benchmark: ``python -m bench.quality`` (see bench/README.md, "Quality").

Streams datasets in a fixed order through the worker's learner at the worker's
defaults (``OnlineLearner`` with the ``LearnerConfig`` the worker builds from
``WorkerSettings``, and its compaction: ``Compactor`` on the same settings),
side by side with River's defaults and, on nonlinear tasks, River's nonlinear
learners, and reports each contender's whole-stream progressive (test-then-train)
metric, computed by one function for all of them (:mod:`bench.quality.metrics`).

Two groups of datasets: ``tuning`` (scikit-learn's bundled datasets in a seeded
shuffled order, River's synthetic generators with drift), on which defaults may
be chosen (``--grid``), and ``kept-aside`` (River's bundled real streams in their
own order), which only check the chosen defaults and must never be tuned on.
"""
