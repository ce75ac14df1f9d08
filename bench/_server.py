"""A benchmark server: the real app over a FakeGenerator (fixed step time, noise images), plus
``/_bench/*`` routes the benchmarks read: generator busy time, event-loop lag, RSS.

    python bench/_server.py --port 8123 --output-dir /tmp/x [--step-ms 50] [--max-queue 64] [--preview-method fast]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import LagProbe, raise_fd_limit, rss_mb  # noqa: E402
from server.app import NO_UPSCALER, create_app  # noqa: E402
from server.config import Settings  # noqa: E402
from server.testing.fakes import FakeGenerator  # noqa: E402


class TimedFakeGenerator(FakeGenerator):
    """Records each generate call's (start, end) in time.time(), for busy fractions over a window."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.intervals: list[tuple[float, float]] = []

    def generate(self, request, on_step, is_cancelled):
        started = time.time()
        try:
            return super().generate(request, on_step, is_cancelled)
        finally:
            self.intervals.append((started, time.time()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--step-ms", type=float, default=50)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--max-queue-per-client", type=int, default=16)
    parser.add_argument("--preview-method", default="fast")
    parser.add_argument("--legacy-sse-encode", action="store_true",
                        help="A/B only: encode SSE events with sse-starlette's generic encoder (before the fix)")
    args = parser.parse_args()
    if args.legacy_sse_encode:
        from sse_starlette import ServerSentEvent

        from server import streaming

        streaming.JsonEvent.encode = ServerSentEvent.encode
    raise_fd_limit()
    settings = Settings(output_dir=Path(args.output_dir), model="tiny-z-image", max_queue=args.max_queue,
                        max_queue_per_client=args.max_queue_per_client, preview_method=args.preview_method,
                        shutdown_grace_s=2.0, log_level="WARNING")
    generator = TimedFakeGenerator(step_s=args.step_ms / 1000, noise=True)
    app = create_app(settings, generator=generator, upscaler=NO_UPSCALER, default_model="tiny-z-image")
    probe = LagProbe()

    @app.get("/_bench/stats")
    async def stats() -> dict:
        runner = app.state.engine.runner
        return {"busy_s": generator.busy_s, "gpu_busy_s": runner.gpu_busy_s, "intervals": generator.intervals,
                "rss_mb": rss_mb(__import__("os").getpid()), "now": time.time()}

    @app.post("/_bench/lag/start")
    async def lag_start() -> dict:
        probe.start()
        return {"ok": True}

    @app.post("/_bench/lag/stop")
    async def lag_stop() -> dict:
        return probe.stop()

    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", ws_max_size=2**21,
                backlog=4096, timeout_keep_alive=60)


if __name__ == "__main__":
    main()
