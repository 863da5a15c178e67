"""`calm serve` under load against LLM.generate on the same requests, in the same run.

    python benchmarks/serve_load.py --concurrency 1 8 32 64 --requests-per-client 4 --max-tokens 128
    python benchmarks/serve_load.py --concurrency 64 --stream-interval 2      # fewer, larger events

For each concurrency c, alternating `--repeats` times: the offline engine (LLM(max_batch_size=c).generate over all
the requests, c decoded at a time; at torch's default thread count, and at the server's) and the server (a `calm
serve` subprocess with 64 slots on a loopback port; c clients, each streaming its share of the requests one after
another over a keep-alive connection). Reported: generated tokens per second of both
and their ratio (the server's overhead), time to first chunk (request sent -> first text event) and inter-chunk
latency (gap between text events of one stream) percentiles. Requests are T = 1 with ignore_eos, so every one
generates max_tokens tokens and the two sides do the same work.

The client is a minimal asyncio HTTP/1.1 reader (no JSON parsing per event) so that it takes as little of the CPU
the server shares with it as possible. On a CPU machine the client, the server's event loop and the engine share the
same cores: the ratio includes that contention.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from calm_engine import LLM, SamplingParams  # noqa: E402

PROMPTS = ["The history of the city", "To be, or not to be", "The module provides", "Enter the king"]
MODEL = "calm-default"


def make_requests(count: int, max_tokens: int) -> list[dict]:
    return [
        {"model": MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "seed": i, "ignore_eos": True}
        for i in range(count)
    ]


def offline_tokens_per_s(requests: list[dict], concurrency: int, threads: int) -> float:
    torch.set_num_threads(threads)
    llm = LLM(max_batch_size=concurrency)
    params = [SamplingParams(max_tokens=r["max_tokens"], seed=r["seed"], ignore_eos=True) for r in requests]
    prompts = [r["prompt"] for r in requests]
    llm.generate(prompts[:concurrency], params[:concurrency])  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outputs) / elapsed


class SSEConnection:
    """One keep-alive HTTP/1.1 connection streaming completions; records when each text event arrives."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def stream(self, request: dict) -> tuple[float, list[float], int]:
        """(time to first text event, gaps between text events, completion tokens from the usage chunk)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps({**request, "stream": True, "stream_options": {"include_usage": True}}).encode()
        head = f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
        sent = time.perf_counter()
        self.writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status = await self.reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"server answered {status!r}")
        while (await self.reader.readline()) not in (b"\r\n", b""):
            pass  # headers: the body is chunked
        times, buffer, usage = [], b"", None
        while True:
            size = int((await self.reader.readline()).strip(), 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                break
            now = time.perf_counter()
            buffer += data[:-2]
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if event.startswith(b'data: {"id"'):
                    if b'"choices":[]' in event or b'"choices": []' in event:
                        usage = json.loads(event[6:])["usage"]
                    else:
                        times.append(now)
        first = times[0] - sent
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return first, gaps, usage["completion_tokens"]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def server_run(url: str, requests: list[dict], concurrency: int) -> dict:
    host, port = re.match(r"http://([^:]+):(\d+)", url).groups()
    pending = iter(requests)
    firsts, gaps, tokens = [], [], 0

    async def client():
        nonlocal tokens
        connection = SSEConnection(host, int(port))
        try:
            for request in pending:
                first, request_gaps, completion = await connection.stream(request)
                firsts.append(first)
                gaps.extend(request_gaps)
                tokens += completion
        finally:
            connection.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": tokens / elapsed, "first_chunk_s": firsts, "inter_chunk_s": gaps, "seconds": elapsed}


def thread_cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds of the server's main thread (the HTTP event loop) and of all its threads (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu(path: str) -> float:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    return cpu(f"/proc/{pid}/task/{pid}/stat"), cpu(f"/proc/{pid}/stat")


def percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"p50": values[0] * 1e3 if values else float("nan"), "p90": float("nan"), "p99": float("nan")}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": q[49] * 1e3, "p90": q[89] * 1e3, "p99": q[98] * 1e3}


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`calm serve` on a free loopback port, started within 120 s."""
    command = [sys.executable, "-m", "calm_engine.cli", "serve", "--port", "0", "--log-level", "warning", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    for line in process.stdout:
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            return process, found.group(1)
        if time.monotonic() > deadline:
            break
    process.kill()
    raise RuntimeError("calm serve did not start")


def measure(url: str, pid: int, requests: list[dict], concurrency: int) -> dict:
    main_before, all_before = thread_cpu_s(pid)
    client_before = time.process_time()
    served = asyncio.run(server_run(url, requests, concurrency))
    main_after, all_after = thread_cpu_s(pid)
    events = len(served["inter_chunk_s"]) + len(requests)
    served["http_cpu_us_per_event"] = 1e6 * (main_after - main_before) / events
    served["client_cpu_us_per_event"] = 1e6 * (time.process_time() - client_before) / events
    return served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="offline and server runs alternate; medians")
    parser.add_argument("--stream-interval", type=int, default=1)
    parser.add_argument("--server-threads", type=int, default=torch.get_num_threads(), help="calm serve --threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    server_args = ["--threads", str(args.server_threads), "--stream-interval", str(args.stream_interval)]
    process, url = start_server(server_args)
    rows = []
    try:
        for concurrency in args.concurrency:
            requests = make_requests(concurrency * args.requests_per_client, args.max_tokens)
            asyncio.run(server_run(url, requests[:concurrency], concurrency))  # warm-up: connections, first steps
            offline, offline_same, runs = [], [], []
            for _ in range(args.repeats):
                offline.append(offline_tokens_per_s(requests, concurrency, default_threads))
                offline_same.append(offline_tokens_per_s(requests, concurrency, args.server_threads))
                runs.append(measure(url, process.pid, requests, concurrency))
            served = statistics.median(r["tokens_per_s"] for r in runs)
            row = {
                "concurrency": concurrency,
                "requests": len(requests),
                "offline_tok_s": statistics.median(offline),
                "offline_server_threads_tok_s": statistics.median(offline_same),
                "server_tok_s": served,
                "ratio": served / statistics.median(offline),
                "ttfc_ms": percentiles([x for r in runs for x in r["first_chunk_s"]]),
                "itl_ms": percentiles([x for r in runs for x in r["inter_chunk_s"]]),
                "http_cpu_us_per_event": statistics.median(r["http_cpu_us_per_event"] for r in runs),
                "client_cpu_us_per_event": statistics.median(r["client_cpu_us_per_event"] for r in runs),
            }
            rows.append(row)
            ttfc, itl = row["ttfc_ms"], row["itl_ms"]
            print(
                f"c={concurrency:3d} x{len(requests):4d}: offline {row['offline_tok_s']:6.0f} tok/s "
                f"({default_threads} threads; {row['offline_server_threads_tok_s']:.0f} at {args.server_threads}), "
                f"server {served:6.0f} tok/s, ratio {row['ratio']:.2f} | first chunk p50/p90/p99 "
                f"{ttfc['p50']:.1f}/{ttfc['p90']:.1f}/{ttfc['p99']:.1f} ms | inter-chunk {itl['p50']:.1f}/"
                f"{itl['p90']:.1f}/{itl['p99']:.1f} ms | CPU/event: loop {row['http_cpu_us_per_event']:.0f} us, "
                f"client {row['client_cpu_us_per_event']:.0f} us",
                flush=True,
            )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    if args.json is not None:
        meta = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.machine()}
        meta |= {"cpus": os.cpu_count(), "args": vars(args) | {"json": str(args.json)}}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
