"""df5t serve on loopback: results equal to Restorer.restore under concurrent load, none lost;
the refusals (401, 413, 415, 400, 503, 504, a foreign Host); a client that vanishes
mid-upload disturbs no one; SIGTERM lets the request in flight finish."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import numpy as np
import pytest
import tifffile

from df5t_deploy import Restorer
from df5t_deploy.client import restore_remote, restore_remote_full

TOKEN = "a-test-token-of-enough-length"


class Server:
    """``df5t serve`` in a subprocess, on a free loopback port."""

    def __init__(self, model, token_file, *args):
        command = [sys.executable, "-c", "from df5t_deploy.cli import entry; entry()", "serve", "--model", str(model),
                   "--port", "0", "--sigma0", "0.1", "--steps", "3", *map(str, args)]
        if token_file is not None:
            command += ["--token-file", str(token_file)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.process.stdout.readline()
        assert line.startswith(("listening on http://127.0.0.1:", "listening on https://127.0.0.1:")), \
            line + self.process.stdout.read()
        self.url = line.split()[-1]
        self.port = urlparse(self.url).port

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        connection.request(method, path, body=body, headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=60)
        return self.process.returncode, output


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("secret") / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def server(model, token_file):
    running = Server(model, token_file, "--max-pending", "4", "--max-bytes", 200_000, "--max-pixels", 100_000,
                     "--max-samples", 2)
    yield running
    running.stop()


def _tiff(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, photometric="minisblack")
    return buffer.getvalue()


def test_sixteen_concurrent_clients_get_exactly_what_restore_gives(server, model, mussel_tile3):
    frames = {(client, i): mussel_tile3[97 * client : 97 * client + 64, 64 * i : 64 * i + 64]
              for client in range(16) for i in range(3)}

    def client(index: int) -> dict:
        return {(index, i): restore_remote_full(server.url, frames[(index, i)], TOKEN, seed=100 * index + i,
                                                busy_wait=120)
                for i in range(3)}

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        answers = {key: value for part in pool.map(client, range(16)) for key, value in part.items()}
    assert time.monotonic() - started < 60 and len(answers) == 48
    local = Restorer(model, sigma0=0.1, steps=3)
    for (index, i), (image, provenance) in answers.items():
        np.testing.assert_array_equal(image, local.restore(frames[(index, i)], seed=100 * index + i))
        assert provenance["seed"] == 100 * index + i and provenance["model_sha256"] == local.model_sha256
    status, _, metrics = server.request("GET", "/metrics")
    assert status == 200 and 'df5t_frames_total{outcome="done"}' in metrics.decode()
    done = int(metrics.decode().split('df5t_frames_total{outcome="done"} ')[1].split()[0])
    assert done >= 48


def test_the_token_is_needed_everywhere_but_health(server):
    assert server.request("GET", "/v1/health", headers={"Authorization": ""})[0] == 200
    for path, method in (("/metrics", "GET"), ("/v1/restore", "POST")):
        assert server.request(method, path, headers={"Authorization": ""})[0] == 401
        assert server.request(method, path, headers={"Authorization": f"Bearer {TOKEN[:-1]}x"})[0] == 401


@pytest.mark.parametrize("case, status, reason", [
    ("not tiff", 415, "image/tiff"),
    ("too many bytes", 413, "--max-bytes"),
    ("too many pixels", 413, "--max-pixels"),
    ("malformed", 400, "not a readable TIFF"),
    ("unknown option", 400, "unknown query options ['path']"),
    ("too many samples", 400, "--max-samples 2"),
    ("constant image", 400, "constant"),
])
def test_bad_requests_are_refused_with_the_reason(server, case, status, reason, mussel_tile3):
    body, path, kind = _tiff(mussel_tile3[:64, :64]), "/v1/restore", "image/tiff"
    if case == "not tiff":
        kind = "application/x-www-form-urlencoded"
    elif case == "too many bytes":
        body = _tiff(np.tile(mussel_tile3[:300, :300], (2, 1)))  # 180 kB of pixels
        body += b"\0" * 30_000
    elif case == "too many pixels":
        body = _tiff(mussel_tile3[:400, :300])  # 120,000 pixels, 120 kB
    elif case == "malformed":
        body = b"II*\0" + b"\xff" * 100
    elif case == "unknown option":
        path += "?path=/etc/passwd"
    elif case == "too many samples":
        path += "?samples=3"
    elif case == "constant image":
        body = _tiff(np.full((64, 64), 5, np.uint8))
    got, headers, answer = server.request("POST", path, body, {"Content-Type": kind})
    assert got == status and reason in json.loads(answer)["error"], answer
    assert not any(name.lower().startswith("access-control") for name in headers)


def test_a_foreign_host_header_is_refused(server):
    assert server.request("GET", "/v1/health", headers={"Host": "attacker.example"})[0] == 400


def test_a_client_that_vanishes_mid_upload_disturbs_no_one(server, mussel_tile3):
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(b"POST /v1/restore HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/tiff\r\n"
                    + f"Authorization: Bearer {TOKEN}\r\nContent-Length: 150000\r\n\r\n".encode() + b"II*\0" * 1000)
    image = mussel_tile3[:64, :64]
    np.testing.assert_array_equal(restore_remote(server.url, image, TOKEN, seed=1),
                                  restore_remote(server.url, image, TOKEN, seed=1))


def _wait_until_in_flight(server: Server) -> None:
    deadline = time.monotonic() + 30
    while b"df5t_queue_depth 1" not in server.request("GET", "/metrics")[2] and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_full_queue_answers_503_and_a_slow_frame_504_and_its_work_stops(model, mussel_tile3):
    slow = Server(model, None, "--max-pending", "1", "--request-timeout", "1", "--steps", "200")
    frame = mussel_tile3[:256, :256]
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(slow.request, "POST", "/v1/restore", _tiff(frame), {"Content-Type": "image/tiff"})
            _wait_until_in_flight(slow)
            status, headers, _ = slow.request("POST", "/v1/restore", _tiff(frame), {"Content-Type": "image/tiff"})
            assert status == 503 and headers.get("retry-after") == "1"
            status, _, answer = first.result(timeout=60)
            assert status == 504 and "--request-timeout 1" in json.loads(answer)["error"]
        deadline = time.monotonic() + 30  # its work stops (at its next step), not after 200 steps
        while b'outcome="cancelled"} 1' not in slow.request("GET", "/metrics")[2] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert b'outcome="cancelled"} 1' in slow.request("GET", "/metrics")[2]
        small = mussel_tile3[:32, :32]  # and it no longer holds the queue
        assert restore_remote(slow.url, small, busy_wait=0).shape == small.shape
    finally:
        slow.stop()


def test_sigterm_lets_the_request_in_flight_finish(model, mussel_tile3):
    server = Server(model, None, "--steps", "100")
    frame = mussel_tile3[:128, :128]
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(restore_remote, server.url, frame, None)
        _wait_until_in_flight(server)
        code, output = server.stop()
        assert in_flight.result(timeout=60).shape == frame.shape  # answered before the server stopped
    assert code in (0, 143), output


def test_unsafe_configurations_are_refused_before_loading(model, tmp_path):
    open_token = tmp_path / "token"
    open_token.write_text(TOKEN)
    open_token.chmod(0o644)
    for args, reason in ((["--host", "0.0.0.0"], "give --token-file"),
                         (["--token-file", open_token], "chmod 600"),
                         (["--tls-cert", open_token], "both --tls-cert and --tls-key")):
        result = subprocess.run([sys.executable, "-c", "from df5t_deploy.cli import entry; entry()", "serve",
                                 "--model", str(model), "--sigma0", "0.1", *map(str, args)],
                                capture_output=True, text=True, timeout=60, env={**os.environ})
        assert result.returncode == 2 and reason in result.stderr, result.stderr


def test_tls_serves_https_with_the_token(model, token_file, tmp_path, mussel_tile3):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = Server(model, token_file, "--tls-cert", cert, "--tls-key", key)
    try:
        assert server.url.startswith("https://")
        frame = mussel_tile3[:64, :64]
        restored = restore_remote(server.url, frame, TOKEN, ca_file=str(cert), seed=2)
        np.testing.assert_array_equal(restored, Restorer(model, sigma0=0.1, steps=3).restore(frame, seed=2))
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):  # an untrusted certificate is refused
            restore_remote(server.url, frame, TOKEN)
    finally:
        server.stop()
