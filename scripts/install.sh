#!/usr/bin/env bash
# Create or reuse .venv and install requirements (with --test: the test requirements and the
# headless browser for the web-client test). Reinstalls only when a requirements file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
want_tests=0; [ "${1:-}" = "--test" ] && want_tests=1
python3 -m venv .venv 2>/dev/null || [ -x .venv/bin/python ]
files="requirements.txt"; [ $want_tests = 1 ] && files="requirements.txt requirements-test.txt"
stamp=".venv/.requirements-$( [ $want_tests = 1 ] && echo test || echo run ).sha256"
digest=$(cat $files | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  if [ $want_tests = 1 ]; then .venv/bin/pip install -q -r requirements-test.txt; else .venv/bin/pip install -q -r requirements.txt; fi
  echo "$digest" > "$stamp"
fi
if [ $want_tests = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  # The browser test drives Debian's Chromium (Playwright's own browser download cannot work offline).
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: chromium not installed; the browser test will be skipped" >&2
  fi
fi
if [ $want_tests = 1 ] && ! command -v redis-server >/dev/null 2>&1; then
  # The scale-out tests (tests/cluster) start a real Redis; they skip its cases without one.
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) || echo "warning: redis-server not installed; its cluster tests will be skipped" >&2
  fi
fi
