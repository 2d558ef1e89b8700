"""st's one retry policy for remote calls: uploads, listings and checks of every target, and webhook posts.

Each remote call goes through `retry_call`: at most ATTEMPTS tries (WEBHOOK_ATTEMPTS for a webhook post), with
exponential backoff and jitter between them (BASE_DELAY doubling up to MAX_DELAY). Only errors known to be transient
are retried (connection resets, timeouts, HTTP 5xx/408/429, S3 `SlowDown`, ...); auth, permission, not-found and
config errors, and every `UserError`, fail at once. The SDKs' own retries are switched off where they have a switch
(botocore, azure-core, dropbox), so that retries are never layered.
"""

from __future__ import annotations

import random
import time
from typing import Callable, TypeVar

from ..errors import UserError
from ..log import get_logger

log = get_logger("publish")

T = TypeVar("T")

ATTEMPTS = 5  # tries per remote call of an upload target, the first included
BASE_DELAY = 0.5  # seconds before the first retry (with jitter: between half of it and all of it), doubling after
MAX_DELAY = 30.0  # the longest pause between two tries
WEBHOOK_ATTEMPTS = 3  # a webhook post: a notification is worth less than the time spent retrying it
WEBHOOK_MAX_DELAY = 2.0

# Exception class names (anywhere in the MRO) that mean "try again" or "never try again", across boto3/botocore,
# requests/httpx, azure-core, b2sdk and the dropbox SDK; matched by name so that none of them has to be imported.
_PERMANENT_NAMES = frozenset({
    "NoCredentialsError", "PartialCredentialsError", "NoRegionError", "ParamValidationError",
    "ClientAuthenticationError", "ResourceNotFoundError", "AuthError", "BadUserAuth", "InvalidAuthToken",
    "Unauthorized", "AccessDenied", "NonExistentBucket", "LocalTokenNotFoundError", "OfflineModeIsEnabled",
})
_TRANSIENT_NAMES = frozenset({
    "ConnectionError", "TimeoutError", "Timeout", "TimeoutException", "TransportError", "NetworkError",
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError", "HTTPClientError",
    "ServiceRequestError", "ServiceResponseError", "IncompleteReadError", "B2ConnectionError", "B2RequestTimeout",
    "ServiceError", "TooManyRequests", "InternalServerError", "RateLimitError",
})
_TRANSIENT_CODES = frozenset({
    "SlowDown", "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable", "Throttling",
    "ThrottlingException", "RequestThrottled", "TooManyRequestsException", "BandwidthLimitExceeded",
})
_PERMANENT_STATUS = frozenset({400, 401, 403, 404, 405, 409, 411, 412, 413, 416, 422})


def _classify(exc: BaseException) -> bool | None:
    """True (transient), False (permanent) or None (this exception alone does not say)."""
    if isinstance(exc, UserError):
        return False
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & _PERMANENT_NAMES:
        return False
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _TRANSIENT_CODES:
            return True
        return isinstance(status, int) and (status >= 500 or status in (408, 429))
    status = getattr(response, "status_code", None)
    if status is None:
        status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        if status in _PERMANENT_STATUS:
            return False
        return status >= 500 or status in (408, 429)
    if names & _TRANSIENT_NAMES:
        return True
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` (or the error it wraps, e.g. boto3's S3UploadFailedError) is worth retrying."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _classify(current)
        if verdict is not None:
            return verdict
        current = current.__cause__ or current.__context__
    return False


def backoff_delay(attempt: int, base_delay: float = BASE_DELAY, max_delay: float = MAX_DELAY,
                  rand: Callable[[], float] = random.random) -> float:
    """Delay before retry `attempt` (1-based): "equal jitter" over base*2**(attempt-1), capped at max_delay.

    Each delay lies in [d/2, d] for a cap d that doubles, so delays never shrink from one retry to the next.
    """
    cap = min(max_delay, base_delay * 2 ** (attempt - 1))
    return cap / 2 + cap / 2 * rand()


def retry_call(fn: Callable[[], T], *, what: str = "upload", attempts: int = ATTEMPTS,
               base_delay: float = BASE_DELAY, max_delay: float = MAX_DELAY,
               sleep: Callable[[float], None] = time.sleep, rand: Callable[[], float] = random.random,
               transient: Callable[[BaseException], bool] = is_transient, quiet: bool = False) -> T:
    """Call `fn` until it succeeds, at most `attempts` times, sleeping with backoff after transient failures.

    A permanent failure, or the last transient one, is raised as it is. Retries are logged as warnings (as debug lines
    when `quiet`: the caller reports the outcome itself).
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt >= attempts or not transient(exc):
                raise
            delay = backoff_delay(attempt, base_delay, max_delay, rand)
            report = log.debug if quiet else log.warning
            report("%s failed (%s: %s); retry %d of %d in %.1f s", what, type(exc).__name__, _short(exc), attempt,
                   attempts - 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
