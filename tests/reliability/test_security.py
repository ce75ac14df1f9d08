"""Security: API keys (HTTP Bearer, WebSocket header or query, constant-time comparison, per-key
job scoping), image path traversal, the CORS allowlist (HTTP and WebSocket origins), and no
traces, paths or internals in any error body."""

from __future__ import annotations

import contextlib
import hmac
import http.client
import json
import threading

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from server import auth
from server.config import Settings
from server.testing.fakes import FakeGenerator, FakeUpscaler
from server.ws.outbox import CLOSE_FORBIDDEN, CLOSE_UNAUTHORIZED
from tests.conftest import SHARED_CACHE, ServerProcess
from tests.reliability.helpers import TIMEOUT, WsClient, assert_no_leak, live, run, wait_until, ws_client

URL = "/v1/images/generations"
KEYS = ["key-alpha", "key-bravo"]


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


# -- API keys ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, bearer("wrong"), bearer("key-alph"), bearer("key-alpha-and-more"),
                                     {"Authorization": "Basic a2V5LWFscGhh"}, {"Authorization": "key-alpha"},
                                     {"X-Api-Key": "key-alpha"}])
def test_http_needs_a_valid_bearer_key(tmp_path, headers):
    with live(tmp_path, api_keys=KEYS) as server:
        refused = [httpx.get(server.url + "/v1/models", headers=headers, timeout=TIMEOUT),
                   httpx.post(server.url + URL, json={"prompt": "x", "size": "64x64"}, headers=headers, timeout=TIMEOUT)]
        allowed = httpx.get(server.url + "/v1/models", headers=bearer("key-bravo"), timeout=TIMEOUT)
    for response in refused:
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    assert allowed.status_code == 200
    assert server.generator.calls == []


def test_key_comparison_is_constant_time_over_every_key(monkeypatch):
    """No early exit: every configured key is compared with hmac.compare_digest, whether the
    presented key matches the first, the last or none."""
    settings = Settings(api_keys=["k1", "k2", "k3"])
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(b) or real(a, b))
    for presented in ("k1", "k3", "nope"):
        calls.clear()
        try:
            auth.authenticate(settings, presented)
        except auth.AuthenticationFailed:
            pass
        assert calls == [b"k1", b"k2", b"k3"], presented


def test_ws_keys_by_header_or_query_and_jobs_scoped_per_key(tmp_path):
    gate = threading.Event()
    with live(tmp_path, generator=FakeGenerator(gate=gate), api_keys=KEYS) as server:
        async def refused(**kwargs):
            async with ws_client(server, "c", **kwargs) as client:
                error = await client.recv()
                with pytest.raises(ConnectionClosed) as closed:
                    await client.recv()
                return error["code"], closed.value.rcvd.code

        async def body():
            refusals = [await refused(), await refused(query="api_key=wrong"),
                        await refused(headers=bearer("key-alphaX"))]
            async with ws_client(server, "same-name", headers=bearer("key-alpha")) as alpha, \
                    ws_client(server, "same-name", query="api_key=key-bravo") as bravo:
                job = (await alpha.create("alpha's secret picture", upscale=False))["job_id"]
                peek = await bravo.request(type="get_status", job_id=job)
                cancel = await bravo.request(type="cancel_job", job_id=job)
                listed = await bravo.request(type="get_client_jobs")
                own_list = await alpha.request(type="get_client_jobs")
                gate.set()
                done = await alpha.until_status(job, "completed", "failed", "cancelled")
            http_alpha = httpx.post(server.url + URL, json={"prompt": "alpha's secret picture", "size": "64x64",
                                                            "seed": 42, "upscale": False, "num_inference_steps": 9,
                                                            "response_format": "url"},
                                    headers=bearer("key-alpha"), timeout=TIMEOUT)
            return refusals, peek, cancel, listed, own_list, done, http_alpha

        refusals, peek, cancel, listed, own_list, done, http_alpha = run(body())
    assert refusals == [("invalid_api_key", CLOSE_UNAUTHORIZED)] * 3
    assert peek["code"] == "job_not_found" and cancel["code"] == "job_not_found"  # not even its existence
    assert listed["jobs"] == [] and [j["job_id"] for j in own_list["jobs"]] == [done["job_id"]]
    assert done["status"] == "completed"  # bravo's cancel did not touch it
    # The same spec over HTTP with the same key is the same (cached) job: scoping is per key, not per protocol.
    assert http_alpha.json()["job_id"] == done["job_id"]


def test_image_urls_are_not_keyed_but_not_derivable_from_the_prompt(tmp_path):
    """Documented decision (RELIABILITY.md): /api/image needs no key, so <img src> and the URLs in
    responses work in browsers; with keys on, a file name carries 32 hex digits of the key-scoped
    job id, which nobody without the key can compute from the prompt and seed."""
    with live(tmp_path, api_keys=KEYS) as server:
        body = {"prompt": "same prompt", "size": "64x64", "seed": 7, "response_format": "url"}
        urls = [httpx.post(server.url + URL, json=body, headers=bearer(k), timeout=TIMEOUT).json()["data"][0]["url"]
                for k in KEYS]
        fetched = httpx.get(urls[0], timeout=TIMEOUT)
    assert urls[0] != urls[1] and urls[0].rsplit("-", 1)[1] != urls[1].rsplit("-", 1)[1]
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"


def test_query_string_keys_are_redacted_in_the_log(tmp_path):
    """The web page sends its key as ``?api_key=`` (browsers cannot set WebSocket headers); uvicorn
    logs every path with its query string. A real server process: its log must not hold the key."""
    key = "sekrit-key-4711"
    server = ServerProcess("--output-dir", str(tmp_path / "out"), "--cache-dir", str(SHARED_CACHE),
                           "--api-keys", key, "--log-level", "INFO")
    server.args[2] = "server.testing.serve"  # the same entry over the fake generator
    with server:
        models = httpx.get(server.url + f"/v1/models?api_key={key}&x=1", headers=bearer(key), timeout=TIMEOUT)

        async def socket():
            async with connect(f"{server.ws_url}/api/ws?client_id=logged&api_key={key}", open_timeout=TIMEOUT) as ws:
                client = WsClient(ws)
                return (await client.request(type="get_client_jobs"))["type"]

        listed = run(socket())
        assert wait_until(lambda: server.output().count("api_key=REDACTED") >= 2)
        log_text = server.output()
    assert models.status_code == 200 and listed == "client_jobs"
    assert key not in log_text
    assert "GET /v1/models?api_key=REDACTED&x=1" in log_text
    assert "WebSocket /api/ws?client_id=logged&api_key=REDACTED" in log_text


# -- path traversal ---------------------------------------------------------------------------------

TRAVERSALS = [
    "../secret.png", "..%2Fsecret.png", "%2e%2e%2fsecret.png", "%2E%2E%2Fsecret.png", "%252e%252e%252fsecret.png",
    "..%252fsecret.png", "%2e%2e/secret.png", "..%5Csecret.png", "..\\secret.png", "%5C..%5Csecret.png",
    "%2Fetc%2Fpasswd", "/etc/passwd", "%2F%2Fetc%2Fpasswd", "C:%5Cwindows%5Cwin.ini", "..", ".", "...",
    "%2e", "%2e%2e", "....%2F%2Fsecret.png", "%c0%ae%c0%ae%c0%afsecret.png", "..%c0%afsecret.png",
    "%uff0e%uff0e%u2215secret.png", "%EF%BC%8E%EF%BC%8E%EF%BC%8Fsecret.png", "good.png%00.txt", "good.png%00",
    "sub%2Fgood.png", "subdir", "linkdir%2Fgood.png", "escape.png", "dirlink.png", ".tmp-abc.part",
    ".tmp-abc.png", "jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm", "missing.png", "good.PNG ",
    "escape.png/", "..%2Fsecret.png/", "good.png%2F..%2F..%2Fsecret.png", "%20good.png", "inner.png", "alias.png",
]


def test_image_route_refuses_every_traversal_form(fake_server, tmp_path):
    outputs = fake_server.app.state.settings.output_dir
    (tmp_path / "secret.png").write_bytes(b"\x89PNG not yours")
    (outputs / "good.png").write_bytes(b"\x89PNG fine")
    (outputs / "escape.png").symlink_to(tmp_path / "secret.png")
    (outputs / "dirlink.png").symlink_to(tmp_path)
    (outputs / "inner.png").symlink_to(outputs / "jobs.sqlite3")  # inside the directory, still never served
    (outputs / "alias.png").symlink_to(outputs / "good.png")
    (outputs / "linkdir").symlink_to(tmp_path)
    (outputs / "subdir").mkdir()
    (outputs / "subdir" / "good.png").write_bytes(b"\x89PNG nested")
    (outputs / ".tmp-abc.png").write_bytes(b"\x89PNG partial")
    statuses = {}
    for name in TRAVERSALS:
        conn = http.client.HTTPConnection("127.0.0.1", fake_server.port, timeout=TIMEOUT)
        conn.request("GET", f"/api/image/{name}".replace(" ", "%20"))
        response = conn.getresponse()
        data = response.read()
        conn.close()
        if response.status == 307:  # Starlette's trailing-slash redirect: the target must be refused too
            location = response.getheader("location")
            assert location.startswith(f"http://127.0.0.1:{fake_server.port}/api/image/"), location
            conn = http.client.HTTPConnection("127.0.0.1", fake_server.port, timeout=TIMEOUT)
            conn.request("GET", location.split(str(fake_server.port), 1)[1])
            response = conn.getresponse()
            data = response.read()
            conn.close()
        statuses[name] = response.status
        assert b"not yours" not in data and b"root:" not in data and b"SQLite" not in data and b"partial" not in data
        assert_no_leak(data.decode("latin-1"), name)
    assert set(statuses.values()) <= {404}, {k: v for k, v in statuses.items() if v != 404}
    assert httpx.get(fake_server.url + "/api/image/good.png").content == b"\x89PNG fine"  # the control case


# -- CORS ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("origin,allowed,listed", [
    ("https://evil.example", False, []), ("http://localhost.evil.example", False, []),
    ("http://127.0.0.1.nip.io", False, []), ("http://localhost:3000", True, []), ("http://127.0.0.1:8080", True, []),
    ("http://[::1]:9", True, []), ("https://app.example", True, []),
    # A sandboxed iframe on any website sends Origin: null, so it is refused unless listed explicitly.
    ("null", False, []), ("null", True, ["null"]),
])
def test_cors_allowlist(tmp_path, origin, allowed, listed):
    with live(tmp_path, cors_origins=["https://app.example", *listed]) as server:
        preflight = httpx.options(server.url + URL, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                              "Access-Control-Request-Headers": "content-type"})
        simple = httpx.get(server.url + "/v1/models", headers={"Origin": origin})

        async def socket():
            async with ws_client(server, origin=origin) as client:
                reply = await client.request(type="get_client_jobs")
                return reply.get("code", reply["type"]), None

        ws_result = run(socket() if allowed else refused_socket(ws_client(server, origin=origin)))
    if allowed:
        assert preflight.headers.get("access-control-allow-origin") == origin
        assert simple.headers.get("access-control-allow-origin") == origin
        assert ws_result == ("client_id_required", None)  # admitted: the anonymous socket answers
    else:
        assert "access-control-allow-origin" not in preflight.headers
        assert "access-control-allow-origin" not in simple.headers
        assert ws_result == ("origin_not_allowed", CLOSE_FORBIDDEN)


async def refused_socket(opening) -> tuple[str, int]:
    """The error frame's code and the close code of a refused WebSocket."""
    async with opening as client:
        error = await client.recv()
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv()
        return error["code"], closed.value.rcvd.code


def raw_status(port: int, host: str, path: str = "/v1/models") -> tuple[int, dict]:
    """GET with an arbitrary Host header, as a browser does after DNS rebinding."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def test_dns_rebinding_is_refused_by_the_host_allowlist(tmp_path):
    """A hostile name re-pointed at 127.0.0.1 makes the browser send ``Host: attacker.example``:
    HTTP gets 421 in the OpenAI envelope, the WebSocket an error frame and close 4403. The
    server's own names (bound address, localhost, [::1], allowed_hosts) keep working."""
    with live(tmp_path, allowed_hosts=["lan-name.example"]) as server:
        port = server.port
        refused = {host: raw_status(port, host) for host in
                   (f"attacker.example:{port}", "attacker.example", f"127.0.0.1.nip.io:{port}", f"localhost.evil:{port}",
                    f"10.0.0.5:{port}", "")}
        allowed = {host: raw_status(port, host)[0] for host in
                   (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST.:{port}", f"[::1]:{port}",
                    f"lan-name.example:{port}", "127.0.0.1")}

        async def rebound_socket():  # same-origin with the attacker's page, so the Origin check passes
            host = f"attacker.example:{port}"
            return await refused_socket(ws_opening(host, port))

        ws_refusal = run(rebound_socket())
    for host, (status, body) in refused.items():
        assert status == 421, host
        assert body["error"]["code"] == "host_not_allowed" and "T2I_ALLOWED_HOSTS" in body["error"]["message"]
    assert set(allowed.values()) == {200}, allowed
    assert ws_refusal == ("host_not_allowed", CLOSE_FORBIDDEN)


@contextlib.asynccontextmanager
async def ws_opening(host: str, port: int):
    """A WebSocket to loopback that names ``host`` in Host and Origin (a page served under it)."""
    async with connect(f"ws://{host}/api/ws", origin=f"http://{host}", host="127.0.0.1", port=port,
                       open_timeout=TIMEOUT) as ws:
        yield WsClient(ws)


def test_ws_same_origin_is_allowed_on_a_listed_host_name(tmp_path):
    """The page served by /ui on a LAN name (listed in allowed_hosts) opens its socket with
    Origin = its own host."""
    with live(tmp_path, allowed_hosts=["lan-name.example"]) as server:
        async def body():
            async with ws_opening(f"lan-name.example:{server.port}", server.port) as client:
                return (await client.request(type="get_status", job_id="0" * 64))["code"]

        assert run(body()) == "job_not_found"


def test_any_ip_literal_host_is_allowed_when_bound_to_all_interfaces(tmp_path):
    """Bound to 0.0.0.0 a LAN client names the machine by its address: a rebinding attack always
    brings a name, so bare addresses are safe to allow; names still need allowed_hosts."""
    with live(tmp_path, host="0.0.0.0") as server:
        by_address = raw_status(server.port, f"192.168.1.20:{server.port}")[0]
        by_name = raw_status(server.port, f"attacker.example:{server.port}")[0]
    assert (by_address, by_name) == (200, 421)


# -- no leaks in error bodies -------------------------------------------------------------------------

class LeakyGenerator(FakeGenerator):
    """Raises what a real stack would: a non-domain error whose text holds paths and internals."""

    def generate(self, request, on_step, is_cancelled):
        if "explode" in request.prompt:
            raise RuntimeError("CUDA error at /root/.venv/lib/python3.11/site-packages/torch/x.py: Traceback")
        return super().generate(request, on_step, is_cancelled)


def test_no_traces_paths_or_internals_in_any_error_body(tmp_path):
    with live(tmp_path, generator=LeakyGenerator(), upscaler=FakeUpscaler(fail=True), max_body_bytes=2048,
              api_keys=["k"]) as server:
        http_cases = [
            ("GET", "/nothing", None, {}), ("DELETE", URL, None, {}), ("GET", "/v1/models", None, {}),
            ("POST", URL, b"{not json", {}), ("POST", URL, b"\xff\xfe", {}), ("POST", URL, b"[" * 5000, {}),
            ("POST", URL, json.dumps({"prompt": 5}).encode(), {}), ("POST", URL, json.dumps({"n": "many"}).encode(), {}),
            ("POST", URL, json.dumps({"prompt": "x", "model": "../../etc"}).encode(), {}),
            ("POST", URL, json.dumps({"prompt": "x", "size": "64x64", "model_type": "\ud800"}).encode(), {}),
            ("POST", URL, b"x" * 4096, {}), ("POST", URL, json.dumps({"prompt": "explode", "size": "64x64"}).encode(), {}),
            ("POST", URL, json.dumps({"prompt": "fail:oom", "size": "64x64"}).encode(), {}),
            ("POST", URL, json.dumps({"prompt": "fail:error", "size": "64x64", "stream": True}).encode(), {}),
            ("POST", URL, json.dumps({"prompt": "explode", "size": "64x64", "stream": True, "seed": 1}).encode(), {}),
            ("POST", URL, json.dumps({"prompt": "upscale me", "size": "64x64", "upscale": True}).encode(), {}),
            ("GET", "/v1/models/..%2F..%2Fetc%2Fpasswd", None, {}), ("GET", "/api/image/..%2Fjobs.sqlite3", None, {}),
        ]
        bodies = []
        for method, path, content, headers in http_cases:
            headers = {"content-type": "application/json", **bearer("k"), **headers}
            if path == "/v1/models":
                headers.pop("Authorization")
            response = httpx.request(method, server.url + path, content=content, headers=headers, timeout=TIMEOUT)
            bodies.append((f"{method} {path} {response.status_code}", response.text))

        async def ws_errors():
            async with ws_client(server, "leaky", query="api_key=k") as client:
                created = await client.create("explode", upscale=False)
                failed = await client.until_status(created["job_id"], "failed")
                frames = ["{", b"\x00", "[" * 50_000, json.dumps({"type": "create_job", "params": {"prompt": 1}})]
                replies = []
                for frame in frames:
                    await client.ws.send(frame)
                    replies.append(await client.recv())
                return [failed, *replies]

        ws_bodies = run(ws_errors())
    assert {text.split()[-1] for text, _ in bodies} >= {"404", "405", "401", "400", "413", "500", "200"}
    for context, text in bodies:
        assert_no_leak(text, context)
    # An error echoing a lone surrogate from the body is still a 400, not a crash in the error handler.
    assert bodies[9][0].endswith(" 400") and "model_type" in bodies[9][1]
    for message in ws_bodies:
        assert_no_leak(json.dumps(message), message.get("type"))
    assert ws_bodies[0]["error"] == "internal error during generation"
