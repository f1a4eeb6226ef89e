"""``streamtrainer serve``: HTTP predictions from the newest model version that passes the gate.

A layer of its own above training (the :class:`~streamtrainer.training.predictor.Predictor`), records
(the models topic's :class:`~streamtrainer.records.model_version.ModelVersion`) and Kafka: a source
(:mod:`.sources`: a checkpoint directory or the models topic) offers each newer version to the
:class:`~.slot.ModelSlot`, whose :class:`~.gate.PromotionGate` decides whether it is served; the
Starlette app (:mod:`.app`) answers from whichever version the slot holds when a request arrives.
See docs/serving.md.
"""
