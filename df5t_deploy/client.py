"""A client for ``df5t serve`` that needs only numpy, tifffile and the standard library (this
file may be copied alone onto an acquisition PC).

    from df5t_deploy.client import restore_remote
    restored = restore_remote("http://gpu-box:8765", image, token=TOKEN, seed=3)
"""

from __future__ import annotations

import io
import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import tifffile

PROVENANCE_HEADER = "X-DF5T-Provenance"


class RemoteError(RuntimeError):
    """The server refused or failed the request; ``status`` is its HTTP status."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status


def restore_remote(url: str, array: np.ndarray, token: str | None = None, *, timeout: float = 600.0,
                   busy_wait: float = 60.0, ca_file: str | None = None, **options) -> np.ndarray:
    """The restoration of ``array`` (YX or ZYX) by the server at ``url``. ``options``: the
    server's per-request options (seed, sigma0 or noise_std, samples). A busy server (503)
    is asked again after its Retry-After, for up to ``busy_wait`` seconds. ``ca_file``: the
    certificate (PEM) to trust for an https server whose certificate is self-signed."""
    return restore_remote_full(url, array, token, timeout=timeout, busy_wait=busy_wait, ca_file=ca_file,
                               **options)[0]


def restore_remote_full(url: str, array: np.ndarray, token: str | None = None, *, timeout: float = 600.0,
                        busy_wait: float = 60.0, ca_file: str | None = None, **options) -> tuple[np.ndarray, dict]:
    """Like ``restore_remote``, with the provenance the server recorded for this frame."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.asarray(array), photometric="minisblack")
    query = urllib.parse.urlencode({name: value for name, value in options.items() if value is not None})
    endpoint = url.rstrip("/") + "/v1/restore" + (f"?{query}" if query else "")
    headers = {"Content-Type": "image/tiff"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    deadline = time.monotonic() + busy_wait
    while True:
        request = urllib.request.Request(endpoint, data=buffer.getvalue(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
                image = tifffile.imread(io.BytesIO(response.read()))
                return image, json.loads(response.headers.get(PROVENANCE_HEADER, "{}"))
        except urllib.error.HTTPError as err:
            retry_after = float(err.headers.get("Retry-After") or 1)
            if err.code == 503 and time.monotonic() + retry_after < deadline:
                time.sleep(retry_after)
                continue
            raise RemoteError(err.code, _reason(err)) from None


def _reason(err: urllib.error.HTTPError) -> str:
    try:
        return json.loads(err.read())["error"]
    except (ValueError, KeyError, TypeError):
        return err.reason
