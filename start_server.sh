#!/usr/bin/env bash
# Start the t2i server on a fresh or prepared machine.
#
#   ./start_server.sh                      # 127.0.0.1:8000, --model auto
#   ./start_server.sh --port 9000 --model z-image-turbo
#   T2I_HOST=0.0.0.0 T2I_PORT=8080 T2I_MODEL=tiny-z-image ./start_server.sh
#
# Creates or reuses .venv and installs requirements.txt only when it changed (scripts/install.sh
# keeps a digest), then execs `python -m server` with all flags passed through. Flags beat T2I_*
# environment variables, which beat the defaults (the server's own settings do this; this script
# only reads them to print the URL). With --model auto (the default) a machine without CUDA gets
# the tiny random-weight demo model, and the server's log says so.
set -euo pipefail
cd "$(dirname "$0")"

scripts/install.sh

host="${T2I_HOST:-127.0.0.1}"
port="${T2I_PORT:-8000}"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --host) host="${args[$((i + 1))]:-$host}" ;;
    --host=*) host="${args[$i]#--host=}" ;;
    --port) port="${args[$((i + 1))]:-$port}" ;;
    --port=*) port="${args[$i]#--port=}" ;;
  esac
done
case "$host" in 0.0.0.0 | "::" | "[::]") show_host=127.0.0.1 ;; *) show_host="$host" ;; esac
case "$show_host" in *:*) show_host="[$show_host]" ;; esac

echo "t2i server starting: open http://${show_host}:${port}/ui (API: http://${show_host}:${port}/v1/images/generations)"
exec .venv/bin/python -m server "$@"
