"""Settings: one place, from CLI flags and ``T2I_*`` environment variables (pydantic-settings).

Precedence: CLI flag > environment variable > default. Every field is also a flag: ``max_queue`` is
``--max-queue``; list fields take comma-separated values (``--api-keys k1,k2``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="T2I_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "auto"  # "auto": z-image-turbo with CUDA, tiny-z-image (random-weight demo) without
    extra_models: CommaList = []  # more model ids served besides ``model``
    # ``name=target`` pairs; a name may be a pattern (``dall-e-*=cogview4``). OpenAI image names
    # (gpt-image-*, chatgpt-image-*, dall-e-*) need none: they mean the default model (core.catalog).
    model_aliases: CommaList = []
    device: str | None = None  # None: cuda when available, else cpu
    max_resident_models: int = 1
    output_dir: Path = Path("outputs")
    cache_dir: Path = Path(".cache")  # tiny demo models and converted upscaler weights; HF weights use HF_HOME
    upscaler_weights: Path | None = None
    upscale_tile: int = 512
    max_in_flight: int = 4  # jobs between 'taken from the queue' and 'files written'; only one holds the GPU
    max_queue: int = 64
    max_queue_per_client: int = 16
    preview_method: Literal["fast", "vae", "none"] = "fast"
    preview_percent: int = 10
    preview_max_side: int = 512
    png_compress_level: int = 3
    max_prompt_chars: int = 4000
    max_n: int = 4
    api_keys: CommaList = []
    cors_origins: CommaList = []  # besides the server's own origin and localhost; "null" only if listed
    # Host header names besides the bound address, localhost, 127.0.0.1, [::1] and public_url's host
    # ("*": any). Other names get 421 / close 4403, so DNS rebinding cannot reach the server.
    allowed_hosts: CommaList = []
    # Proxies whose X-Forwarded-For gives the client address (for per-address queue limits);
    # default none: the connecting address is the client ("*": trust any, only behind a proxy).
    forwarded_allow_ips: CommaList = []
    # Connections (server.connections): a whole request within this many seconds, or closed;
    # open connections (HTTP and WebSocket) in total and per client address, beyond: 503.
    request_read_timeout_s: float = 15.0
    send_timeout_s: float = 30.0  # a response the client reads nothing of for this long is dropped
    # Finished images re-encoded as jpeg/webp: cached up to this many bytes; at most this many
    # encodes at once (more wait), so repeat requests cost no CPU and a flood cannot take every core.
    variant_cache_bytes: int = 256 * 1024**2
    max_concurrent_encodes: int = 1
    max_connections: int = 1000
    # Image requests (generations, edits, variations, stream resumes) being waited on or answered
    # at once, cached answers included; beyond: 503 (total) / 429 (per address), Retry-After 2.
    max_image_requests: int = 256
    max_image_requests_per_address: int = 64
    max_connections_per_address: int = 100
    # Retention (server.core.retention; single node): finished jobs with their images and links,
    # jobs that never made an image, the image size budget (oldest first, never younger than
    # retention_min_age_s), and how often it runs.
    retention_finished_s: float = 7 * 86_400.0
    retention_unstarted_s: float = 60.0
    output_max_bytes: int = 5 * 1024**3
    retention_min_age_s: float = 3600.0
    retention_interval_s: float = 30.0
    # New jobs are refused (503 storage_unavailable) while the output directory's disk has less
    # free space than this; accepted again once space is back (server.core.disk). 0: no check.
    min_free_disk_bytes: int = 256 * 1024**2
    public_url: str | None = None  # base for absolute image URLs; default: from the request
    shutdown_grace_s: float = 30.0
    sse_ping_s: float = 15.0
    ws_max_frame_bytes: int = 1_048_576
    # JSON request bodies; larger ones get 413. A generation request is a few kB (two 4000-character
    # prompts, escaped, stay under 100 kB); 1 MiB of `{}` in an ignored field was ~19 MB parsed.
    max_body_bytes: int = 131_072
    max_upload_bytes: int = 26_214_400  # multipart bodies of /v1/images/edits and /variations; larger: 413
    max_input_pixels: int = 16_777_216  # an edit's input image or mask (4096x4096); checked before decoding
    log_level: str = "INFO"
    # LoRA adapters (README "LoRA adapters"): *.safetensors files in this directory, by file name;
    # None: the feature is off. Per request up to max_loras; loaded adapters are kept (least recently
    # used dropped first) up to max_loaded_loras files and max_loaded_lora_bytes of files per model.
    lora_dir: Path | None = None
    max_loras: int = 4
    max_loaded_loras: int = 8
    max_loaded_lora_bytes: int = 2_147_483_648
    # Scale-out (docs/scale-out.md). None: the single-node embedded mode (SQLite + in-process queue).
    backend: str | None = None  # e.g. "redis://127.0.0.1:6379/0" (Redis >= 7.0 or Valkey >= 7.2)
    role: Literal["all", "api", "worker"] = "all"  # with a backend: API node, GPU worker, or both in one process
    node_id: str | None = None  # this process's consumer name in the queue; default: host-pid-random
    reclaim_idle_ms: int = 60_000  # a job whose worker shows no GPU progress this long is taken over
    max_deliveries: int = 3  # a job running at this many worker deaths (or, single node, process deaths) ends failed
    result_ttl_s: int = 86_400  # finished job records (the result cache) expire after this
    redis_max_connections: int = 64  # per process; callers wait for a free connection (BlockingConnectionPool)
    key_prefix: str = "t2i:"
    event_stream_maxlen: int = 256  # per-job event stream cap (approximate; progress/previews beyond it are trimmed)

    @field_validator("extra_models", "model_aliases", "api_keys", "cors_origins", "allowed_hosts",
                     "forwarded_allow_ips", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @property
    def db_path(self) -> Path:
        return self.output_dir / "jobs.sqlite3"

    def alias_map(self, default_model: str) -> dict[str, str]:
        """``name=target`` pairs (name may be an fnmatch pattern); target ``default`` means the
        server's default model."""
        aliases = {}
        for pair in self.model_aliases:
            name, _, target = pair.partition("=")
            aliases[name.strip()] = default_model if target.strip() in ("", "default") else target.strip()
        return aliases


def parse_cli(argv: list[str] | None = None) -> Settings:
    """Build Settings from flags (each field as ``--kebab-name``) layered over the environment."""
    parser = argparse.ArgumentParser(prog="python -m server", description="Streaming text-to-image server")
    for name, field in Settings.model_fields.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=field.description)
    given = {name: value for name, value in vars(parser.parse_args(argv)).items() if value is not None}
    return Settings(**given)
