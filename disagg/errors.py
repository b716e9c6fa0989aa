"""Errors a caller may want to catch by type."""


class OverloadedError(RuntimeError):
    """A worker could not admit a request within its admission deadline; retry later or add replicas."""


class RequestFailedError(RuntimeError):
    """A request failed on a worker; the message names the worker and the cause."""


class WorkerDiedError(RequestFailedError):
    """The worker serving a request died; ``worker_id`` names it."""

    def __init__(self, worker_id: str, message: str) -> None:
        super().__init__(message)
        self.worker_id = worker_id
