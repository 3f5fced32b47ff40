"""Python SDK of sandboxd: isolated sandboxes to run Python in, behind the Sandbox API.

::

    from sandboxd import Sandbox

    with Sandbox(mode="container", agent_id="data-processor",
                 filesystem={"read_only": ["/workspace/data"], "read_write": ["/workspace/output"]},
                 resources={"cpu": "0.5", "memory": "512m", "timeout": 300}) as sb:
        sb.upload("/workspace/data/sales.csv", "sales.csv")
        run = sb.run("import csv\\nresult = len(list(csv.reader(open('/workspace/data/sales.csv'))))")
        print(run.status, run.result)

The server is ``$SANDBOXD_URL`` (default http://127.0.0.1:8080) and the key ``$AGENTCOP_API_KEY``
or ``$SANDBOXD_API_KEY``, unless ``Client(base_url, api_key)`` (or ``base_url=``/``api_key=``) says
otherwise. Standard library only; Python 3.9 or later.
"""

from .client import DEFAULT_URL, Client
from .errors import (
    CapacityExhausted,
    ChecksumMismatch,
    ConcurrencyLimit,
    Conflict,
    ConnectionFailed,
    ContextLimit,
    ImageNotApproved,
    InternalError,
    InvalidRequest,
    NotFound,
    PathNotAllowed,
    PayloadTooLarge,
    ProvisioningFailed,
    RateLimited,
    RunFailed,
    RunQueueFull,
    SandboxDestroyed,
    SandboxdError,
    SandboxNotReady,
    Unauthorized,
    Unavailable,
    Unsupported,
    UnsupportedInMode,
    WaitTimeout,
)
from .sandbox import CodeContext, Event, FileEntry, FileWritten, Run, RunHandle, Sandbox

__version__ = "0.1.0"

__all__ = [
    "Sandbox",
    "Run",
    "RunHandle",
    "Event",
    "FileEntry",
    "FileWritten",
    "Client",
    "DEFAULT_URL",
    "SandboxdError",
    "InvalidRequest",
    "Unauthorized",
    "ImageNotApproved",
    "PathNotAllowed",
    "NotFound",
    "SandboxDestroyed",
    "SandboxNotReady",
    "PayloadTooLarge",
    "Conflict",
    "ConcurrencyLimit",
    "RunQueueFull",
    "ContextLimit",
    "CodeContext",
    "RateLimited",
    "Unsupported",
    "UnsupportedInMode",
    "CapacityExhausted",
    "ProvisioningFailed",
    "Unavailable",
    "InternalError",
    "ConnectionFailed",
    "ChecksumMismatch",
    "WaitTimeout",
    "RunFailed",
]
