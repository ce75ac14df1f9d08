"""``python -m server.testing.serve --fake-step-s 0.05 <python -m server flags>``: the real server,
every role, over ``FakeGenerator`` (that many seconds per step) and ``FakeUpscaler`` instead of a
model. For tests and benchmarks only; production code never imports this module.

It goes through the same entry as ``python -m server`` (``server.__main__.main``: settings,
bootstrap, serve) with the fakes injected. ``main(generator_class=...)`` lets a test's own launcher
script serve a ``FakeGenerator`` subclass.
"""

from __future__ import annotations

import argparse
import sys

from server.__main__ import main as server_main
from server.testing.fakes import FakeGenerator, FakeUpscaler


def main(argv: list[str] | None = None, generator_class: type[FakeGenerator] = FakeGenerator) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.testing.serve", add_help=False)
    parser.add_argument("--fake-step-s", type=float, default=0.0, help="seconds per denoising step of the fake")
    parser.add_argument("--fake-upscale-s", type=float, default=0.0, help="seconds per image of the fake upscaler")
    parser.add_argument("--fake-upscale-tiles", type=int, default=1, help="tiles per image of the fake upscaler")
    parser.add_argument("--fake-upscale-tile-s", type=float, default=0.0, help="seconds per tile of the fake upscaler")
    parser.add_argument("--fake-noise", action="store_true", help="noise images: incompressible, as large as real ones")
    known, rest = parser.parse_known_args(argv)
    return server_main(rest, generator=generator_class(step_s=known.fake_step_s, noise=known.fake_noise),
                       upscaler=FakeUpscaler(delay_s=known.fake_upscale_s, tile_s=known.fake_upscale_tile_s,
                                             tiles=known.fake_upscale_tiles))


if __name__ == "__main__":
    sys.exit(main())
