"""disagg: disaggregated LLM serving on Ray.

Prefill workers compute a prompt's KV cache and first token, decode workers
pull that KV (by NIXL, or through the Ray object store) and generate with
continuous batching, and a coordinator actor routes requests between them.
"""

from disagg.autoscale import AutoscalePolicy
from disagg.config import EngineConfig, Timeouts, WorkerResources
from disagg.errors import OverloadedError, RequestFailedError, WorkerDiedError
from disagg.outputs import FinishReason, RequestMetrics, RequestOutput
from disagg.sampling import SamplingParams

__all__ = [
    "AutoscalePolicy",
    "Cluster",
    "EngineConfig",
    "FinishReason",
    "OverloadedError",
    "RequestFailedError",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "Timeouts",
    "WorkerDiedError",
    "WorkerResources",
    "launch",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The driver API pulls in Ray; import it only when asked so the library
    # stays cheap to import for unit tests and tools.
    if name in ("launch", "Cluster"):
        from disagg import client

        return getattr(client, name)
    raise AttributeError(f"module 'disagg' has no attribute {name!r}")
