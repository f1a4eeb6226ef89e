"""streamtrainer: train PyTorch models on a Kafka stream.

Data flows producer -> records (codec) -> consumer -> training -> metrics; a
module only imports modules at or after its own stage (training knows nothing
of Kafka).
"""

__version__ = "0.1.0"
