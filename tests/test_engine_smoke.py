import httpx

def test_health(fake_server):
    r = httpx.get(fake_server.url + "/health")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tiny-z-image"
