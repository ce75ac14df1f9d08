"""Connection limits (issue 16 item 3), on a real server process: a request must arrive in full
within ``request_read_timeout_s`` (silent and half-sent connections are closed, 408 when no
request had started) while long responses and WebSockets are not cut; open connections are
capped in total and per address with a 503 in the OpenAI envelope; ``RLIMIT_NOFILE`` is raised at
startup. 127.0.0.2 and up stand in for other machines."""

from __future__ import annotations

import functools
import json
import resource
import socket
import subprocess
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import SHARED_CACHE, ServerProcess
from tests.reliability.helpers import TIMEOUT, WsClient, run, wait_until

PARTIAL_HEADERS = b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n"
PARTIAL_BODY = PARTIAL_HEADERS + b"Content-Type: application/json\r\n\r\n" + b'{"prompt": "'


def fake_server(tmp_path, *flags: str, **popen) -> ServerProcess:
    server = ServerProcess("--output-dir", str(tmp_path / "out"), "--cache-dir", str(SHARED_CACHE), *flags,
                           popen=functools.partial(subprocess.Popen, **popen) if popen else None)
    server.args[1:3] = ["-m", "server.testing.serve"]
    return server


def raw_socket(port: int, source: str = "127.0.0.1", send: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT, source_address=(source, 0))
    if send:
        sock.sendall(send)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends before it closes the connection (TIMEOUT at most)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def get_from(url: str, source: str) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=TIMEOUT) as client:
        return client.get(url + "/health")


def test_silent_and_half_sent_connections_are_closed_but_long_answers_are_not(tmp_path):
    # 2 s: under load a client may take a while between connecting and sending its request.
    with fake_server(tmp_path, "--request-read-timeout-s", "2", "--fake-step-s", "0.4") as server:
        started = time.monotonic()
        silent = [raw_socket(server.port) for _ in range(20)]
        half_headers = [raw_socket(server.port, send=PARTIAL_HEADERS) for _ in range(20)]
        half_body = [raw_socket(server.port, send=PARTIAL_BODY) for _ in range(10)]
        answers = {name: [read_until_closed(sock) for sock in group]
                   for name, group in (("silent", silent), ("headers", half_headers), ("body", half_body))}
        closed_after = time.monotonic() - started
        for sock in silent + half_headers + half_body:
            sock.close()

        # A stream that lasts longer than the read timeout (10 steps x 0.4 s) is not cut, and a
        # WebSocket opened before it is still there after it.
        async def long_answers():
            async with connect(server.ws_url + "/api/ws?client_id=stays", open_timeout=TIMEOUT) as ws:
                client = WsClient(ws)
                events = []
                async with httpx.AsyncClient(timeout=30) as http:
                    async with http.stream("POST", server.url + "/v1/images/generations",
                                           json={"prompt": "slow", "size": "64x64", "num_inference_steps": 10,
                                                 "stream": True}) as response:
                        events.append(response.status_code)
                        async for line in response.aiter_lines():
                            if line.startswith("data:"):
                                events.append(line[5:].strip())
                return events, (await client.request(type="get_client_jobs"))["type"]

        events, ws_reply = run(long_answers())
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers["silent"] + answers["headers"])
    assert all(not a.startswith(b"HTTP/1.1 2") for a in answers["body"])  # closed mid-body: no answer
    assert closed_after < TIMEOUT
    assert events[0] == 200 and events[-1] == "[DONE]" and ws_reply == "client_jobs", events


def test_open_connections_are_capped_in_total_and_per_address(tmp_path):
    with fake_server(tmp_path, "--max-connections-per-address", "3", "--max-connections", "6") as server:
        first = [raw_socket(server.port, "127.0.0.1") for _ in range(3)]
        assert wait_until(lambda: get_from(server.url, "127.0.0.9").status_code == 200)  # all 3 counted
        per_address = get_from(server.url, "127.0.0.1")
        with pytest.raises(InvalidStatus) as ws_refused:
            run(connect(server.ws_url + "/api/ws", open_timeout=TIMEOUT).__aenter__())
        other_address = get_from(server.url, "127.0.0.2")
        second = [raw_socket(server.port, "127.0.0.2") for _ in range(3)]
        total = get_from(server.url, "127.0.0.3")
        for sock in first:
            sock.close()
        recovered = wait_until(lambda: get_from(server.url, "127.0.0.1").status_code == 200)
        for sock in second:
            sock.close()
    assert per_address.status_code == 503 and per_address.headers["retry-after"] == "5"
    error = per_address.json()["error"]
    assert error["code"] == "too_many_connections" and "per address" in error["message"]
    assert ws_refused.value.response.status_code == 503
    assert other_address.status_code == 200
    assert total.status_code == 503 and "6 open connections" in total.json()["error"]["message"]
    assert recovered


def test_the_open_file_limit_is_raised_at_startup(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")
    low = functools.partial(resource.setrlimit, resource.RLIMIT_NOFILE, (256, hard))
    with fake_server(tmp_path, preexec_fn=low) as server:
        limits = open(f"/proc/{server.proc.pid}/limits").read()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    raised = int(line.split()[3])
    assert raised > 256 and raised == (65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)), line


BIG = {"prompt": "large answer", "size": "1024x1024", "n": 4, "seed": 5, "num_inference_steps": 1, "upscale": False}


def test_a_client_that_does_not_read_is_dropped_after_the_send_timeout(tmp_path):
    """A 4 x 1024^2 noise answer (~16 MB of base64) to clients that read nothing: after
    ``send_timeout_s`` the server aborts each connection, which frees its buffer; a client that
    reads gets the whole answer."""
    body = json.dumps(BIG).encode()
    request = (b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    with fake_server(tmp_path, "--fake-noise", "--send-timeout-s", "1") as server:
        full = httpx.post(server.url + "/v1/images/generations", json=BIG, timeout=120)
        length = int(full.headers["content-length"])
        stalled = []
        for _ in range(5):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing, buffers little
            sock.settimeout(TIMEOUT)
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(request)
            stalled.append(sock)
        aborted = wait_until(lambda: server.output().count("aborted a response") >= 5, timeout=60)
        received = [len(read_until_closed(sock)) for sock in stalled]
        for sock in stalled:
            sock.close()
    assert full.status_code == 200 and length > 15_000_000 and len(full.json()["data"]) == 4
    assert aborted and all(0 < size < length for size in received), (received, length)
