"""A bad record read by two consumer groups: two dead letters naming their group; one redrive (#15, 6)."""

from __future__ import annotations

import json
from collections.abc import Callable

from streamtrainer.consumer.dead_letter import (
    GROUP,
    dead_letter_topic,
    read_dead_letter_log,
    read_dead_letters,
    redrive,
    select,
)
from streamtrainer.consumer.worker import Worker
from streamtrainer.settings import KafkaSettings
from tests.helpers import produce_tracked, worker_settings


def _record(i: int) -> tuple[bytes, None]:
    if i % 10 == 3:
        return b'{"features": [1, 2, 3, 4], "label": 9}', None  # label_out_of_range
    x = [((i * 7 + k) % 11) / 10 for k in range(4)]
    return json.dumps({"features": x, "label": float(sum(x) > 2)}).encode(), None


def test_two_groups_dead_letter_a_record_each_and_a_redrive_publishes_it_once(
    bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory(partitions=1)
    n = 40
    delivered = produce_tracked(bootstrap, topic, [_record(i) for i in range(n)])
    bad = {delivered[i] for i in range(n) if i % 10 == 3}
    groups = ("dlq-groups-a", "dlq-groups-b")
    for group in groups:
        status = Worker(worker_settings(bootstrap, topic, group, model="logistic", stop_at_end=True)).run()
        assert status.records_invalid == len(bad)

    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    letters = list(read_dead_letters(kafka, dead_letter_topic(topic, None)))
    # Before: the headers did not name the group, and both groups' letters had the record's own key.
    assert sorted((letter.source[1:], letter.header(GROUP)) for letter in letters) == sorted(
        (source, group) for source in bad for group in groups
    )
    assert len({letter.record_key for letter in letters}) == 2 * len(bad)

    log = read_dead_letter_log(kafka, dead_letter_topic(topic, None))
    selection = select(log, topic=topic, skip_redriven=True)
    result = redrive(kafka, selection.letters, dead_letter_topic=dead_letter_topic(topic, None))
    # Before: each record was published twice, once per group's letter.
    assert (result.published, result.marked) == (len(bad), 2 * len(bad))
    again = select(
        read_dead_letter_log(kafka, dead_letter_topic(topic, None)), topic=topic, skip_redriven=True
    )
    assert again.letters == [] and again.already_redriven == 2 * len(bad)
