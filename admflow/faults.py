"""Which errors are worth a second try: an allow-list of transient faults.

A stage is retried only when what stopped it may pass by itself: a lost or refused
connection, a timeout, a server-side error (HTTP 5xx), throttling, or a Ray node or worker
that went away. Anything else (a corrupt checkpoint, a missing file, a bad config, a bug)
fails at once, since a retry would only repeat it after a delay. The exception and its
causes (``raise ... from``, or the error being handled when it was raised) are all looked at,
so a StorageError that wraps a dropped connection is retried and one that names a corrupt
file is not. Classes are matched by name so that the optional clients (botocore, aiohttp,
requests, Ray) need not be importable here.
"""

from __future__ import annotations

import errno
from typing import Any

# Class names (anywhere in the exception's MRO) of connection loss and timeouts in the
# standard library, botocore, aiohttp, requests/urllib3 and httpx.
TRANSIENT_CLASSES = frozenset(
    {
        "ConnectionError",  # builtin (reset, refused, aborted, broken pipe), botocore, requests
        "TimeoutError",
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ClientConnectionError",  # aiohttp
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "ClientPayloadError",
        "Timeout",  # requests
        "ProtocolError",  # urllib3: connection aborted mid-response
        "TransportError",  # httpx
        # Ray: a node or a worker process lost (preemption, a killed machine), not an error
        # raised by the code it ran
        "NodeDiedError",
        "WorkerCrashedError",
        "ObjectLostError",
        "OwnerDiedError",
    }
)
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EPIPE,
    }
)
# Error codes that S3 and its look-alikes give for "slow down" and "try again".
THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "SlowDown",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestThrottled",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "InternalError",
        "TEMPORARILY_UNAVAILABLE",  # MLflow's REST error codes
        "RESOURCE_EXHAUSTED",
    }
)


def is_transient(exc: BaseException | None) -> bool:
    """True when ``exc`` or one of its causes is a transient fault (see the module doc)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _transient_itself(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _transient_itself(exc: BaseException) -> bool:
    if any(cls.__name__ in TRANSIENT_CLASSES for cls in type(exc).__mro__):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    status = http_status(exc)
    if status is not None and (status >= 500 or status == 429):
        return True
    return error_code(exc) in THROTTLING_CODES


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an error carries: botocore's ClientError, requests' HTTPError or
    MLflow's RestException; None when it carries none."""
    response: Any = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return int(status) if isinstance(status, int) else None
    status = getattr(response, "status_code", None) or getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status
    getter = getattr(exc, "get_http_status_code", None)
    # Only MLflow's RestException is an answer from a server; its other exceptions map
    # their codes to a status (a generic one to 500) without any server having answered.
    if callable(getter) and type(exc).__name__ == "RestException":
        try:
            value = getter()
        except Exception:
            return None
        return value if isinstance(value, int) else None
    return None


def error_code(exc: BaseException) -> str | None:
    response: Any = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = (response.get("Error") or {}).get("Code")
        return str(code) if code else None
    if type(exc).__name__ != "RestException":  # see http_status
        return None
    code = getattr(exc, "error_code", None)
    return str(code) if code else None
