"""The client of the served model: post an image to a predictions URL and get the REST answer.

The demo, the benchmarks and notebook 04 all post through :func:`post_image`. It retries what a restarting
worker or a busy server answers (503, 507, a refused or reset connection) with exponential backoff, up to
``retries`` times, and says so when it gives up; a 4xx is the client's own fault and is never retried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

RETRY_STATUSES = (503, 507)
"""TorchServe's answers while a worker restarts or its queue is full: worth asking again."""


class PredictionError(RuntimeError):
    """The server answered an error, or could not be reached; ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def post_image(url: str, image: str | Path | bytes, headers: Mapping[str, str] | None = None,
               timeout: float = 120.0, retries: int = 3, backoff: float = 0.5, session=None) -> dict:
    """POST one image to a predictions URL and return its answer (the REST contract's dict).

    Args:
        url: e.g. ``Server.predictions_url()``.
        image: an image file or its bytes, sent as the raw body (``Content-Type: application/octet-stream``).
        headers: e.g. ``Server.headers()`` when token authorization is on.
        timeout: seconds to wait for one answer.
        retries: further tries after a 503/507 or a failed connection; 0 tries once.
        backoff: seconds before the first retry, doubled before each next one.
        session: a ``requests.Session`` to reuse connections (one per thread); default: a new connection.

    Raises:
        PredictionError: the server answered another error (its message included), or the retries ran out.
    """
    import requests

    body = image if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()
    sent = {"Content-Type": "application/octet-stream", **dict(headers or {})}
    poster = session or requests
    for attempt in range(retries + 1):
        last = attempt == retries
        try:
            response = poster.post(url, data=body, headers=sent, timeout=timeout)
        except (requests.ConnectionError, requests.Timeout) as err:
            if last:
                raise PredictionError(f"{url}: no answer after {retries + 1} tries: {err}") from err
            log.warning("%s: %s; retrying in %.1f s", url, type(err).__name__, backoff * 2**attempt)
        else:
            if response.status_code == 200:
                return response.json()
            if response.status_code not in RETRY_STATUSES or last:
                tries = f" after {attempt + 1} tries" if attempt else ""
                raise PredictionError(f"{url} answered {response.status_code}{tries}: {_message(response)}",
                                      response.status_code)
            log.warning("%s answered %d; retrying in %.1f s", url, response.status_code, backoff * 2**attempt)
        time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


def _message(response) -> str:
    """The ``message`` of a TorchServe JSON error, else the body or the reason."""
    try:
        return response.json().get("message", response.text)
    except ValueError:
        return response.text or response.reason
