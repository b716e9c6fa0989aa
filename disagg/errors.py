"""Errors a caller may want to catch by type."""


class OverloadedError(RuntimeError):
    """A worker could not admit a request within its admission deadline; retry later or add replicas."""


class RequestFailedError(RuntimeError):
    """A request failed on a worker; the message names the worker and the cause."""
