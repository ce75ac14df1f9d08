"""``python -m tests.cluster.fake_worker --fake-step-s 0.05 <python -m server flags>``: the server
launcher of ``server.testing.serve`` with a generator that can take its worker down: a prompt
containing ``crash:worker`` ends the process (``os._exit``) at step 2, mid-job, to show how a job
that keeps killing workers ends (bounded deliveries, then failed)."""

from __future__ import annotations

import logging
import os
import sys

from server.testing import serve
from server.testing.fakes import FakeGenerator

log = logging.getLogger(__name__)
CRASH_PROMPT = "crash:worker"
CRASH_EXIT_CODE = 17


class CrashingFakeGenerator(FakeGenerator):
    def generate(self, request, on_step, is_cancelled):
        if CRASH_PROMPT not in request.prompt:
            return super().generate(request, on_step, is_cancelled)

        def crash(update):
            if update.step >= 2:
                log.error("%s prompt: exiting the process (testing aid)", CRASH_PROMPT)
                os._exit(CRASH_EXIT_CODE)  # no cleanup, no goodbye to Redis: like a lost machine
            on_step(update)

        return super().generate(request, crash, is_cancelled)


if __name__ == "__main__":
    sys.exit(serve.main(generator_class=CrashingFakeGenerator))
