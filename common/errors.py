"""Errors that reach a person: each carries one line naming the culprit and what was expected."""


class FedloraError(Exception):
    """Base class; the CLIs print these as one line, without a traceback."""


class ConfigError(FedloraError):
    """A config file or override is malformed or out of range."""


class DataError(FedloraError):
    """The institution's data cannot be read or does not fit the task."""


class ModelError(FedloraError):
    """A base model cannot be found or built."""


class AdapterError(FedloraError):
    """An adapter or update is malformed: wrong keys, shapes, non-finite values, foreign base model."""


class BudgetExceeded(FedloraError):
    """Training would spend more privacy than the institution's budget allows."""


class TrainingDiverged(AdapterError):
    """Local training produced non-finite values: the adapter is neither sent nor exported."""


class CheckpointError(FedloraError):
    """A checkpoint is missing a part or cannot be read."""


class SecureAggregationError(FedloraError):
    """A secure aggregation round broke its protocol (a tampered share, a roster or survivor list that
    would reveal a mask, a message out of order): the round stops and reveals nothing more."""


class RoundDiscarded(SecureAggregationError):
    """Fewer institutions than the threshold are left: the round is dropped and nothing is unmasked."""
