"""LoRA adapters with the Redis backend: real ``python -m server`` API node and tiny-model worker,
each with its own --lora-dir. Same content: the job runs on the worker with the adapter. A worker
whose file differs from the API node's fails the job with a reason naming the adapter."""

from __future__ import annotations

import shutil

import openai
import pytest

from tests.conftest import SHARED_CACHE, ServerProcess
from tests.lora_helpers import write_adapter

pytest.importorskip("peft")


def node(kv, tmp_path, role: str, lora_dir) -> ServerProcess:
    return ServerProcess("--backend", kv.url, "--role", role, "--model", "tiny-z-image", "--cache-dir",
                         str(SHARED_CACHE), "--output-dir", str(tmp_path / "shared-out"), "--lora-dir", str(lora_dir),
                         "--shutdown-grace-s", "2")


def test_workers_load_from_their_own_dir_and_refuse_other_content(redis_kv, tmp_path):
    api_dir, worker_dir = tmp_path / "api-loras", tmp_path / "worker-loras"
    write_adapter(api_dir / "alpha.safetensors", SHARED_CACHE, seed=1)
    write_adapter(api_dir / "beta.safetensors", SHARED_CACHE, seed=2)
    worker_dir.mkdir()
    shutil.copy(api_dir / "alpha.safetensors", worker_dir / "alpha.safetensors")
    write_adapter(worker_dir / "beta.safetensors", SHARED_CACHE, seed=3)  # same name, other content
    with node(redis_kv, tmp_path, "worker", worker_dir), node(redis_kv, tmp_path, "api", api_dir) as api:
        client = openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def generate(loras):
            return client.images.generate(prompt="a lighthouse", size="64x64",
                                          extra_body={"seed": 2, "num_inference_steps": 2, "loras": loras})

        plain, adapted = generate([]), generate([{"name": "alpha"}])
        assert adapted.data[0].b64_json != plain.data[0].b64_json
        with pytest.raises(openai.BadRequestError) as caught:
            generate([{"name": "beta"}])
        assert caught.value.body["param"] == "loras" and "beta" in caught.value.body["message"]
        assert "differs" in caught.value.body["message"]
        assert generate([]).data[0].b64_json == plain.data[0].b64_json  # still serving, nothing leaked
