"""Regenerate the results tables in BENCHMARKS.md from bench/results/*.json.

Replaces everything between ``<!-- results:begin -->`` and ``<!-- results:end -->``; the prose
around it is left alone. Missing result files are reported as 'not run'.

    .venv/bin/python bench/report.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "BENCHMARKS.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def f(x, digits=1) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def goal_rows() -> list[str]:
    rows = []
    s = load("streaming")
    if s:
        for size, m in s["median"].items():
            ratio = m["stream_fast"]["ratio_vs_plain_none"]
            rows.append(f"| 1 | streamed (fast previews) / not streamed, {size}^2 | <= 1.02 | {ratio:.3f} "
                        f"(vs not streamed with previews made: {m['stream_fast']['ratio_vs_plain_fast']:.3f}) | {verdict(ratio <= 1.02)} |")
            rows.append(f"| 1 | `vae` previews streamed / not streamed, {size}^2 | (report) | {m['stream_vae']['ratio_vs_plain_none']:.3f} | n/a |")
    o = load("overhead")
    if o:
        for size, m in o["median"].items():
            rows.append(f"| 2 | HTTP url / raw pipe, {size}^2 (CPU) | <= 1.03 on GPU; CPU: ms added | "
                        f"{m['ratio_vs_raw']['url_fast']:.3f} ({m['added_ms_vs_raw']['url_fast']:+.0f} ms); b64_json "
                        f"{m['ratio_vs_raw']['b64_fast']:.3f} ({m['added_ms_vs_raw']['b64_fast']:+.0f} ms); zero-time model: "
                        f"{m['ms']['url_zero']:.0f} / {m['ms']['b64_zero']:.0f} ms | n/a on CPU |")
    lt = load("latency")
    if lt:
        for name, m in lt["preview_latency"].items():
            ok = m["p50_ms"] <= 10 and m["p99_ms"] <= 50
            rows.append(f"| 3 | preview latency, {name.replace('_', ' ')} | p50 <= 10, p99 <= 50 ms | "
                        f"p50 {f(m['p50_ms'])}, p99 {f(m['p99_ms'])} ms ({m['events']} events) | {verdict(ok)} |")
        t = lt["ttfb_while_busy"]
        rows.append(f"| 4 | first byte while the GPU is busy: SSE headers | <= 50 ms | p50 {f(t['sse_headers_p50_ms'])}, "
                    f"p99 {f(t['sse_headers_p99_ms'])} ms | {verdict(t['sse_headers_p50_ms'] <= 50)} |")
        rows.append(f"| 4 | first event while the GPU is busy: WS `create_job` reply (pending) | <= 50 ms | "
                    f"p50 {f(t['ws_create_job_reply_p50_ms'])}, p99 {f(t['ws_create_job_reply_p99_ms'])} ms | "
                    f"{verdict(t['ws_create_job_reply_p50_ms'] <= 50)} |")
        if "sse_first_body_p50_ms" in t:
            rows.append(f"| 4 | first SSE body bytes while the GPU is busy (`: job <id>` comment) | <= 50 ms | "
                        f"p50 {f(t['sse_first_body_p50_ms'])}, p99 {f(t['sse_first_body_p99_ms'])} ms | "
                        f"{verdict(t['sse_first_body_p50_ms'] <= 50)} |")
        rows.append("| 4 | first SSE data event while the GPU is busy | (report) | the first preview, once the job "
                    "reaches the GPU | n/a |")
        c = lt["cache_hit"]
        for name in ("ws_create_job", "http_url", "http_b64_json", "http_stream"):
            rows.append(f"| 5 | cache hit, {name.replace('_', ' ')}, {c['size']}^2 | p50 <= 5 ms | p50 {f(c[name]['p50_ms'], 2)}, "
                        f"p99 {f(c[name]['p99_ms'], 2)} ms | {verdict(c[name]['p50_ms'] <= 5)} |")
        tp = lt["throughput"]
        for fmt in ("url", "b64_json"):
            m = tp[fmt]
            rows.append(f"| 6 | generator busy fraction, 8 clients, {fmt}, {tp['size']}^2 | >= 0.95 | {m['busy_fraction']:.3f} "
                        f"(first start to last generation end: {m['busy_fraction_first_start_to_last_end']:.3f}) | "
                        f"{verdict(m['busy_fraction'] >= 0.95)} |")
    sc = load("scale")
    if sc:
        lag = sc["event_loop_lag"]
        ok = sc["streams_completed"] == sc["streams"] and sc["websockets_open_at_end"] == sc["websockets"] and lag["p99_ms"] < 50
        rows.append(f"| 7 | {sc['streams']} SSE streams + {sc['websockets']} idle WS, one process | all complete, lag p99 < 50 ms | "
                    f"{sc['streams_completed']}/{sc['streams']} streams, {sc['websockets_open_at_end']}/{sc['websockets']} WS open, "
                    f"lag p50 {lag['p50_ms']} / p99 {lag['p99_ms']} / max {lag['max_ms']} ms; "
                    f"{sc['rss_kb_per_idle_ws']} KB RSS per idle WS | {verdict(ok)} |")
    g = load("gpu")
    rows.append("| 8 | GPU figures | (report) | " + ("see gpu.json" if g and not g.get("dry_run") else
                "not run: no GPU for this task (`python bench/bench_gpu.py` on CUDA)") + " | n/a |")
    return rows


def detail_sections() -> list[str]:
    out = []
    s = load("streaming")
    if s:
        out += ["", f"### 1. Streaming overhead ({s['model']}, {s['steps']} steps, median of {s['repeats']}, seconds)", "",
                "| size | variant | wall s | ratio vs plain_none | intermediates | first intermediate s | gap s |",
                "|---|---|---|---|---|---|---|"]
        for size, m in s["median"].items():
            for name, v in m.items():
                out.append(f"| {size} | {name} | {v['wall_s']:.3f} | {v['ratio_vs_plain_none']:.3f} | {v.get('partials', '')} | "
                           f"{v.get('first_partial_s', '')} | {v.get('partial_gap_s', '')} |")
    o = load("overhead")
    if o:
        out += ["", f"### 2. Server overhead ({o['model']}, {o['steps']} steps, median of {o['repeats']}, ms)", "",
                "| size | raw pipe | url (fast) | b64 (fast) | url (none) | b64 (none) | zero-time model url | zero-time b64 |",
                "|---|---|---|---|---|---|---|---|"]
        for size, m in o["median"].items():
            ms = m["ms"]
            out.append(f"| {size} | {ms['raw']:.0f} | {ms['url_fast']:.0f} | {ms['b64_fast']:.0f} | {ms['url_none']:.0f} | "
                       f"{ms['b64_none']:.0f} | {ms['url_zero']:.1f} | {ms['b64_zero']:.1f} |")
        out += ["", "Pieces, each timed alone on the image the pipe made (median ms):", "",
                "| size | PNG bytes | PNG lvl1 | PNG lvl3 (server) | PNG lvl6 | write+fsync | read+base64 | JSON body | one fast preview | HTTP round trip |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for size, p in o["pieces"].items():
            out.append(f"| {size} | {p['png_bytes']} | {p['png_encode_level1_ms']} | {p['png_encode_level3_ms']} | "
                       f"{p['png_encode_level6_ms']} | {p['write_atomic_fsync_ms']} | {p['read_and_base64_ms']} | "
                       f"{p['json_body_b64_ms']} | {p['fast_preview_one_ms']} | {p['http_roundtrip_get_models_ms']} |")
    fx = load("fix_sse")
    if fx:
        out += ["", f"### Fix A/B: SSE event encoding ({fx['model']}, {fx['size']}^2, {fx['repeats']} interleaved repeats)", "",
                "| variant | preview p50 ms (16 streams) | preview p99 ms | preview max ms | cache-hit stream p50 ms |",
                "|---|---|---|---|---|"]
        for name, m in fx["ab"].items():
            out.append(f"| {name} | {m['preview_p50_ms']} | {m['preview_p99_ms']} | {m['preview_max_ms']} | {m['cache_hit_stream_p50_ms']} |")
    runs = [load(n) for n in ("streaming", "overhead", "latency", "fix_sse", "scale")]
    out += ["", "### Runs", "", "| benchmark | command | finished | load average start -> end |", "|---|---|---|---|"]
    for d in runs:
        if d:
            out.append(f"| {d['benchmark']} | `{d['command']}` | {d['finished_at']} | "
                       f"{d['machine']['loadavg_at_start'][0]:.1f} -> {d['loadavg_at_end'][0]:.1f} |")
    return out


def main() -> None:
    first = next((d for d in (load(n) for n in ("streaming", "overhead", "latency", "scale")) if d), None)
    lines = [BEGIN, ""]
    if first:
        m = first["machine"]
        lines.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m.get('ram_gb', '?')} GB RAM, no GPU, Python {m['python']}.")
    lines += ["", "| # | measure | goal | measured (median) | verdict |", "|---|---|---|---|---|", *goal_rows(),
              *detail_sections(), "", END]
    text = DOC.read_text() if DOC.is_file() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(head + "\n".join(lines) + tail)
    print(f"updated {DOC}")


if __name__ == "__main__":
    main()
