"""The worker daemon: consumes samples from Kafka and hands them to the training layer."""

from streamtrainer.consumer.worker import Worker, WorkerStatus

__all__ = ["Worker", "WorkerStatus"]
