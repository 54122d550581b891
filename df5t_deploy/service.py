"""``df5t serve``: restorations over HTTP for acquisition PCs, from one shared ``Restorer``.

An ASGI application (Starlette, served by uvicorn). Requests go through ``Restorer.submit``,
so the model is loaded once and frames queue in order; a full queue answers 503 with
Retry-After, a request that outlives ``request_timeout`` answers 504 and its work is
cancelled. The task and model are fixed when the server starts; a request may only choose
``QUERY_OPTIONS``, and nothing it sends names a path.

Safe by default: loopback only unless a token file is given (``check_exposure``); with a
token every endpoint but ``/v1/health`` needs ``Authorization: Bearer <token>`` (compared in
constant time); the Host header must be a loopback name or an ``allowed_hosts`` entry (DNS
rebinding); no CORS headers; bodies must be ``image/tiff`` (cross-site form posts cannot
send it); bodies over ``max_bytes`` and images over ``max_pixels`` (read from the TIFF
header, before decoding) are refused with 413.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import ipaddress
import json
import os
import resource
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .api import Restorer
from .frames import QueueFull
from .progress import RestorationCancelled
from .version import __version__

#: What a request may choose, each parsed by its function; all else is fixed at start.
QUERY_OPTIONS = {"seed": int, "sigma0": lambda text: text if text == "auto" else float(text), "noise_std": float,
                 "samples": int}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
PROVENANCE_HEADER = "X-DF5T-Provenance"
DEFAULT_MAX_BYTES = 256 * 2**20
DEFAULT_MAX_PIXELS = 2**26  # 8192 x 8192
DEFAULT_MAX_SAMPLES = 8
DEFAULT_REQUEST_TIMEOUT_S = 300.0
RETRY_AFTER_S = 1
LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServiceRefused(ValueError):
    """The server's own configuration is unsafe or invalid; the message says what to change."""


@dataclass(frozen=True)
class ServiceLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_samples: int = DEFAULT_MAX_SAMPLES
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S


def is_loopback(host: str) -> bool:
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(path: str | Path) -> str:
    """The bearer token in ``path``; a file others may read is refused (the token is a password)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        token = path.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise ServiceRefused(f"--token-file {path}: cannot be read ({err.strerror or err})") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ServiceRefused(f"--token-file {path} may be read by other users (mode {stat.filemode(mode)}); "
                             f"run `chmod 600 {path}`")
    if len(token) < 16:
        raise ServiceRefused(f"--token-file {path}: the token must be at least 16 characters "
                             "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return token


def check_exposure(host: str, token: str | None) -> None:
    """Binding beyond loopback needs a token: a restoration server is compute for anyone."""
    if not is_loopback(host) and token is None:
        raise ServiceRefused(f"--host {host} is reachable from other machines; give --token-file (and use "
                             "--tls-cert/--tls-key), or bind to 127.0.0.1")


@dataclass
class Metrics:
    """Counters for ``/metrics`` (Prometheus text exposition)."""

    done: int = 0
    failed: int = 0
    rejected_busy: int = 0
    timed_out: int = 0
    cancelled: int = 0
    in_flight: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, seconds: float) -> None:
        with self.lock:
            self.done += 1
            self.latency_sum += seconds
            index = next((i for i, bound in enumerate(LATENCY_BUCKETS_S) if seconds <= bound), len(LATENCY_BUCKETS_S))
            self.latency_counts[index] += 1

    def count(self, name: str, delta: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + delta)

    def text(self) -> str:
        with self.lock:
            lines = [
                "# HELP df5t_queue_depth Requests being restored or waiting.", "# TYPE df5t_queue_depth gauge",
                f"df5t_queue_depth {self.in_flight}",
                "# HELP df5t_frames_total Frames answered, by outcome.", "# TYPE df5t_frames_total counter",
                f'df5t_frames_total{{outcome="done"}} {self.done}',
                f'df5t_frames_total{{outcome="failed"}} {self.failed}',
                f'df5t_frames_total{{outcome="busy"}} {self.rejected_busy}',
                f'df5t_frames_total{{outcome="timeout"}} {self.timed_out}',
                f'df5t_frames_total{{outcome="cancelled"}} {self.cancelled}',
                "# HELP df5t_latency_seconds Time from request to restored frame.",
                "# TYPE df5t_latency_seconds histogram",
            ]
            cumulative = 0
            for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), self.latency_counts, strict=True):
                cumulative += count
                lines.append(f'df5t_latency_seconds_bucket{{le="{"+Inf" if bound == float("inf") else bound}"}} '
                             f"{cumulative}")
            lines += [f"df5t_latency_seconds_sum {self.latency_sum:.6f}", f"df5t_latency_seconds_count {self.done}"]
        lines += _memory_lines()
        return "\n".join(lines) + "\n"


def _memory_lines() -> list[str]:
    lines = ["# HELP df5t_host_memory_peak_bytes Peak resident memory of the server process.",
             "# TYPE df5t_host_memory_peak_bytes gauge",
             f"df5t_host_memory_peak_bytes {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}"]
    torch = sys.modules.get("torch")  # only if a backend loaded it: never imported for metrics
    if torch is not None and torch.cuda.is_available():
        lines += ["# HELP df5t_device_memory_bytes GPU memory held by PyTorch's allocator, per device.",
                  "# TYPE df5t_device_memory_bytes gauge"]
        lines += [f'df5t_device_memory_bytes{{device="cuda:{i}"}} {torch.cuda.memory_reserved(i)}'
                  for i in range(torch.cuda.device_count())]
    return lines


class RequestError(Exception):
    """A request that cannot be served: its HTTP status and the reason, for the answer."""

    def __init__(self, status: int, reason: str, headers: dict | None = None):
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


def parse_options(query: dict[str, str], limits: ServiceLimits) -> dict:
    unknown = sorted(set(query) - set(QUERY_OPTIONS))
    if unknown:
        raise RequestError(400, f"unknown query options {unknown}; allowed: {', '.join(QUERY_OPTIONS)}")
    try:
        options = {name: QUERY_OPTIONS[name](value) for name, value in query.items()}
    except ValueError as err:
        raise RequestError(400, f"bad query option: {err}") from None
    if options.get("samples", 1) > limits.max_samples:
        raise RequestError(400, f"samples {options['samples']} is over this server's --max-samples "
                                f"{limits.max_samples}")
    return options


def decode_tiff(body: bytes, max_pixels: int) -> np.ndarray:
    """The image of a TIFF body; its size is read from the header and refused (413) before
    any pixel is decoded."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(body)) as tiff:
            series = tiff.series
            if not series:
                raise RequestError(400, "the body is not a readable TIFF (it holds no image)")
            if len(series) != 1:
                raise RequestError(400, f"the TIFF holds {len(series)} image series; send one")
            pixels = int(np.prod(series[0].shape))
            if pixels > max_pixels:
                raise RequestError(413, f"the image has {pixels} pixels, over this server's --max-pixels {max_pixels}")
            return series[0].asarray()
    except RequestError:
        raise
    except Exception as err:  # tifffile's many ways of saying "not a TIFF"
        raise RequestError(400, f"the body is not a readable TIFF ({err})") from None


def encode_tiff(image: np.ndarray) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, photometric="minisblack")
    return buffer.getvalue()


def _was_cancelled(future) -> bool:
    return future.cancelled() or isinstance(future.exception(), RestorationCancelled)


def build_app(restorer: Restorer, *, token: str | None = None, limits: ServiceLimits = ServiceLimits(),
              allowed_hosts: tuple[str, ...] = ()):
    """The ASGI application serving ``restorer``."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    metrics = Metrics()

    def refused(error: RequestError) -> Response:
        return JSONResponse({"error": error.reason}, status_code=error.status, headers=error.headers)

    def authorised(request: Request) -> bool:
        if token is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": __version__, "task": restorer.options.task,
                             "model_sha256": restorer.model_sha256})

    async def metrics_text(request: Request) -> Response:
        if not authorised(request):
            return refused(RequestError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}))
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limits.max_bytes):
            raise RequestError(413, f"the body is over this server's --max-bytes {limits.max_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_bytes:
                raise RequestError(413, f"the body is over this server's --max-bytes {limits.max_bytes}")
            chunks.append(chunk)
        return b"".join(chunks)

    async def restore(request: Request) -> Response:
        started = time.perf_counter()
        try:
            if not authorised(request):
                raise RequestError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
            media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "image/tiff":
                raise RequestError(415, f"send the image as Content-Type: image/tiff, not {media_type or 'nothing'}")
            options = parse_options(dict(request.query_params), limits)
            body = await read_body(request)
            image = await asyncio.to_thread(decode_tiff, body, limits.max_pixels)
            result = await _restored(image, options)
        except RequestError as error:
            return refused(error)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody reads it: the client is gone
        metrics.observe(time.perf_counter() - started)
        payload = await asyncio.to_thread(encode_tiff, result.image)
        return Response(payload, media_type="image/tiff",
                        headers={PROVENANCE_HEADER: json.dumps(result.provenance, separators=(",", ":"))})

    async def _restored(image: np.ndarray, options: dict):
        cancelled = threading.Event()
        try:
            future = restorer.submit(image, block=False, progress=lambda event: not cancelled.is_set(), **options)
        except QueueFull:
            metrics.count("rejected_busy")
            raise RequestError(503, "the restoration queue is full; retry later",
                               {"Retry-After": str(RETRY_AFTER_S)}) from None
        except (TypeError, ValueError) as err:
            raise RequestError(400, str(err)) from None
        metrics.count("in_flight")
        result = asyncio.wrap_future(future)
        result.add_done_callback(lambda done: done.cancelled() or done.exception())  # read, even after a 504
        try:
            return await asyncio.wait_for(asyncio.shield(result), limits.request_timeout)
        except asyncio.TimeoutError:
            cancelled.set()  # a running frame stops at its next step; a queued one is dropped
            future.cancel()
            future.add_done_callback(lambda done: metrics.count("cancelled") if _was_cancelled(done) else None)
            metrics.count("timed_out")
            raise RequestError(504, f"not restored within this server's --request-timeout {limits.request_timeout:g} s")\
                from None
        except RestorationCancelled:
            raise RequestError(504, "cancelled") from None
        except (ValueError, TypeError) as err:  # the image's problem (constant, NaN, too small ...)
            metrics.count("failed")
            raise RequestError(400, str(err)) from None
        except Exception as err:
            metrics.count("failed")
            raise RequestError(500, f"restoration failed: {err}") from None
        finally:
            metrics.count("in_flight", -1)

    hosts = list(LOOPBACK_NAMES) + list(allowed_hosts)
    return Starlette(
        routes=[Route("/v1/health", health), Route("/v1/restore", restore, methods=["POST"]),
                Route("/metrics", metrics_text)],
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)],
    )


def serve(restorer: Restorer, host: str, port: int, *, token: str | None = None,
          limits: ServiceLimits = ServiceLimits(), allowed_hosts: tuple[str, ...] = (),
          tls: tuple[str, str] | None = None, announce=print) -> None:
    """Serve until SIGINT or SIGTERM, which stop taking requests and let those in flight
    finish. ``announce`` gets ``listening on URL`` once the port is bound (``port`` 0: a
    free one)."""
    import socket

    import uvicorn

    check_exposure(host, token)
    if not is_loopback(host) and host not in ("0.0.0.0", "::"):
        allowed_hosts = (*allowed_hosts, host)  # the address clients use to reach it
    app = build_app(restorer, token=token, limits=limits, allowed_hosts=allowed_hosts)
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)  # connections made once the address is announced wait for the server
    except OSError as err:
        sock.close()
        raise ServiceRefused(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    config = uvicorn.Config(app, log_level="warning", ssl_certfile=tls[0] if tls else None,
                            ssl_keyfile=tls[1] if tls else None, timeout_graceful_shutdown=limits.request_timeout)
    server = uvicorn.Server(config)
    bound_port = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if family == socket.AF_INET6 else host
    announce(f"listening on {'https' if tls else 'http'}://{shown}:{bound_port}")
    server.run(sockets=[sock])
