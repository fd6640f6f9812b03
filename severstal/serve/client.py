"""The client of the served model: post an image to a model URL and get the REST answer.

The demo, the benchmarks and notebook 04 all post through :func:`post_image`. It speaks both routes of
both servers (TorchServe and Ray Serve), chosen by the URL alone (:func:`model_url`): the native
``/predictions/NAME`` and the Open Inference Protocol's ``/v2/models/NAME/infer`` (the image sent with the
binary tensor extension; the answer turned back into the native one by
:func:`severstal.serve.oip.record_from_response`), so the caller gets the same dict from either.

It retries what a restarting worker or a busy server answers (503, 507, a refused or reset connection, a
timeout) with exponential backoff, up to ``retries`` times, logs each retry and raises
:class:`PredictionError` saying how many tries it made when it gives up. TorchServe answers the requests of
a batch whose worker died with the message "Worker died." and 500 (507 when it sees the worker was killed),
and Ray Serve's proxy those of a dead replica with a plain-text 500: those are retried too. Any other 4xx
is the client's own fault and is never retried, nor is another 500 (the model failed on this very image and
would again).

With the defaults (5 retries from 0.5 s, doubled, at most 8 s apart) a request survives about 15 s without
an answer, longer than a killed worker takes to restart on a CPU, so no request of :func:`post_image` is lost
to it (``severstal bench soak --kill-worker-at`` measures it; docs/serving.md).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from severstal.serve import oip

log = logging.getLogger(__name__)

PROTOCOLS = ("native", "oip")
"""The routes a model answers on: ``/predictions/NAME`` and the Open Inference Protocol's ``/v2/models/NAME/infer``."""
_INFER_PATH = re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/infer/?")


def model_url(base: str, model: str = "severstal", protocol: str = "native") -> str:
    """The URL to post images to: ``BASE/predictions/MODEL`` or ``BASE/v2/models/MODEL/infer``.

    Args:
        base: the server's inference address, e.g. ``http://127.0.0.1:8080``.
        model: the model name.
        protocol: one of :data:`PROTOCOLS`.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; allowed: {list(PROTOCOLS)}")
    base = base.rstrip("/")
    return f"{base}/predictions/{model}" if protocol == "native" else f"{base}/v2/models/{model}/infer"


def url_protocol(url: str) -> str:
    """The protocol of a model URL: ``oip`` for ``.../v2/models/NAME/infer``, else ``native``."""
    return "oip" if _INFER_PATH.fullmatch(urlsplit(url).path) else "native"

RETRY_STATUSES = (503, 507)
"""TorchServe's answers while a worker restarts or its queue is full: worth asking again."""
WORKER_DIED = "Worker died."
"""TorchServe's message (with 500, or 507 after SIGKILL) for the requests of a batch whose worker died. Ray
Serve's proxy answers those of a dead replica with a plain-text 500: both are retried."""


def bearer_headers(key: str | None) -> dict:
    """The ``Authorization`` header of TorchServe's token authorization for ``key``; empty without a key."""
    return {"Authorization": f"Bearer {key}"} if key else {}


class PredictionError(RuntimeError):
    """The server answered an error, or could not be reached; ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


MAX_BACKOFF = 8.0
"""Seconds: the longest wait between two tries."""


def post_image(url: str, image: str | Path | bytes, headers: Mapping[str, str] | None = None,
               timeout: float = 120.0, retries: int = 5, backoff: float = 0.5, session=None,
               on_retry: Callable[[str, int], None] | None = None) -> dict:
    """POST one image to a model URL and return its answer (the REST contract's dict), on either route.

    Args:
        url: e.g. ``Server.predictions_url()`` or :func:`model_url` with ``protocol="oip"``.
        image: an image file or its bytes, sent as the raw body (``Content-Type: application/octet-stream``),
            or as the ``image`` input of an ``infer`` request on a ``/v2/models/NAME/infer`` URL.
        headers: e.g. ``Server.headers()`` when token authorization is on.
        timeout: seconds to wait for one answer.
        retries: further tries after a 503/507 or a failed connection; 0 tries once.
        backoff: seconds before the first retry, doubled before each next one (at most :data:`MAX_BACKOFF`).
        session: a ``requests.Session`` to reuse connections (one per thread); default: a new connection.
        on_retry: called as ``on_retry(reason, attempt)`` before each retry, where ``reason`` is the status
            ("503") or the exception's name ("ConnectionError"): benchmarks count what the server failed.

    Raises:
        PredictionError: the server answered another error (its message included), or the retries ran out.
    """
    import requests

    body = image if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()
    infer = url_protocol(url) == "oip"
    sent = {"Content-Type": "application/octet-stream"}
    if infer:
        body, sent = oip.encode_infer_request(bytes(body))
    sent.update(headers or {})
    poster = session or requests
    for attempt in range(retries + 1):
        last = attempt == retries
        delay = min(backoff * 2**attempt, MAX_BACKOFF)
        try:
            response = poster.post(url, data=body, headers=sent, timeout=timeout)
        except (requests.ConnectionError, requests.Timeout) as err:
            reason = type(err).__name__
            if last:
                log.error("%s: giving up after %d tries: %s", url, retries + 1, reason)
                raise PredictionError(f"{url}: no answer after {retries + 1} tries: {err}") from err
            log.warning("%s: %s; retry %d of %d in %.1f s", url, reason, attempt + 1, retries, delay)
        else:
            if response.status_code == 200:
                return oip.record_from_response(response.json()) if infer else response.json()
            died = WORKER_DIED in response.text or (response.status_code == 500 and not _json_error(response))
            if not (response.status_code in RETRY_STATUSES or died) or last:
                tries = f" after {attempt + 1} tries" if attempt else ""
                if attempt:
                    log.error("%s: giving up after %d tries: %d", url, attempt + 1, response.status_code)
                raise PredictionError(f"{url} answered {response.status_code}{tries}: {_message(response)}",
                                      response.status_code)
            reason = f"{response.status_code} worker died" if died else str(response.status_code)
            log.warning("%s answered %s; retry %d of %d in %.1f s", url, reason, attempt + 1, retries, delay)
        if on_retry is not None:
            on_retry(reason, attempt)
        time.sleep(delay)
    raise AssertionError("unreachable")


def _json_error(response) -> bool:
    """Whether an error answer is a JSON object: the servers' and the worker's own errors are; the 500 of Ray
    Serve's proxy when a replica dies under a request is plain text ("Internal Server Error")."""
    try:
        return isinstance(response.json(), dict)
    except ValueError:
        return False


def _message(response) -> str:
    """The ``message`` of a TorchServe JSON error (``error`` in the Open Inference Protocol), else the body."""
    try:
        body = response.json()
        return body.get("message", body.get("error", response.text))
    except (ValueError, AttributeError):
        return response.text or response.reason
