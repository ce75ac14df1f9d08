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
if [ $want_tests = 1 ]; then
  # Real client libraries for tests/openai_api/test_compat.py, each in a folder of its own so that the old
  # 1.x SDK never replaces the newest one in .venv (the tests run it with PYTHONPATH).
  old_sdk=".venv/openai-1x"; old_stamp="$old_sdk/.requirements.sha256"
  old_digest=$(sha256sum requirements-openai-1x.txt | cut -d' ' -f1)
  if [ "$(cat "$old_stamp" 2>/dev/null)" != "$old_digest" ]; then
    rm -rf "$old_sdk" && .venv/bin/pip install -q --target "$old_sdk" -r requirements-openai-1x.txt
    echo "$old_digest" > "$old_stamp"
  fi
  node_dir=".venv/node-openai"; node_stamp="$node_dir/.package.sha256"
  node_digest=$(sha256sum tests/openai_api/compat/package.json | cut -d' ' -f1)
  if command -v npm >/dev/null 2>&1 && [ "$(cat "$node_stamp" 2>/dev/null)" != "$node_digest" ]; then
    mkdir -p "$node_dir" && cp tests/openai_api/compat/package.json "$node_dir/package.json"
    if (cd "$node_dir" && npm install -q --no-audit --no-fund >/dev/null); then echo "$node_digest" > "$node_stamp"
    else echo "warning: npm install failed; the node SDK tests will be skipped" >&2; fi
  fi
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
