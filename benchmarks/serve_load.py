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

The client (benchmarks/sse_client.py, on uvloop where installed) parses the streams in protocol callbacks, without
JSON per event, so that it takes as little as possible of the CPU the server shares with it; `--client openai` drives
the same load through the official openai client instead (slower: for checking, not for the ratio). Either way every
stream's text is checked against LLM.generate's for the same seed after each run. On a CPU machine the client, the
server's event loop and the engine share the same cores: the ratio includes that contention.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: calm_engine, benchmarks

import torch  # noqa: E402

from benchmarks.sse_client import SSEConnection, StreamResult  # noqa: E402
from calm_engine import LLM, SamplingParams  # noqa: E402

PROMPTS = ["The history of the city", "To be, or not to be", "The module provides", "Enter the king"]
MODEL = "calm-default"


def make_requests(count: int, max_tokens: int) -> list[dict]:
    return [
        {"model": MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "seed": i, "ignore_eos": True}
        for i in range(count)
    ]


def offline_run(requests: list[dict], concurrency: int, threads: int, meter: OthersLoad) -> tuple[float, list[str]]:
    """(tokens per second, text of each request) of LLM.generate over the requests, `concurrency` at a time."""
    torch.set_num_threads(threads)
    llm = LLM(max_batch_size=concurrency)
    params = [SamplingParams(max_tokens=r["max_tokens"], seed=r["seed"], ignore_eos=True) for r in requests]
    prompts = [r["prompt"] for r in requests]
    llm.generate(prompts[:concurrency], params[:concurrency])  # warm-up
    with meter:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outputs) / elapsed, [o.text for o in outputs]


class OthersLoad:
    """The share of the machine's CPU that other processes than this one and the server took during a timed run
    (Linux /proc): the machine is shared, and a run beside someone else's compiler measures little."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.share = float("nan")
        self._tick = os.sysconf("SC_CLK_TCK")

    def _sample(self) -> tuple[float, float, float]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait, in ticks
        own = time.process_time() + thread_cpu_s(self.server_pid)[1]
        return busy / self._tick, own, time.perf_counter()

    def __enter__(self) -> OthersLoad:
        self._start = self._sample()
        return self

    def __exit__(self, *exc) -> None:
        busy, own, wall = (b - a for a, b in zip(self._start, self._sample(), strict=True))
        self.share = max(0.0, busy - own) / (wall * os.cpu_count())


async def lean_streams(host: str, port: int, requests: list[dict], concurrency: int) -> list[StreamResult]:
    """Each request streamed by one of `concurrency` clients (each its requests one after another on one keep-alive
    connection), in request order, as received (parsed later: stream_stats)."""
    pending = iter(range(len(requests)))
    results: list = [None] * len(requests)

    async def client():
        connection = await SSEConnection.open(host, port)
        try:
            for i in pending:
                results[i] = await connection.stream(host, requests[i])
        finally:
            connection.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


async def openai_streams(url: str, requests: list[dict], concurrency: int) -> list[tuple[float, list, str]]:
    """As lean_streams, through the official openai client, each parsed as it arrives: (time to first text, gaps
    between text chunks, text)."""
    import openai

    pending = iter(range(len(requests)))
    results: list = [None] * len(requests)

    async def one(client, request: dict):
        sent, times, text = time.perf_counter(), [], ""
        fields = {k: v for k, v in request.items() if k != "ignore_eos"}
        stream = await client.completions.create(stream=True, extra_body={"ignore_eos": True}, **fields)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter())
                text += chunk.choices[0].text
        return times[0] - sent, [b - a for a, b in zip(times, times[1:], strict=False)], text

    async def client_loop(client):
        for i in pending:
            results[i] = await one(client, requests[i])

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return results


def server_run(url: str, requests: list[dict], concurrency: int, client: str = "lean") -> dict:
    host, port = re.match(r"http://([^:]+):(\d+)", url).groups()
    if client == "lean":
        streams = lambda: lean_streams(host, int(port), requests, concurrency)  # noqa: E731
    else:
        streams = lambda: openai_streams(url, requests, concurrency)  # noqa: E731
    start = time.perf_counter()
    results = run_async(streams())
    elapsed = time.perf_counter() - start
    tokens = sum(r["max_tokens"] for r in requests)  # ignore_eos: each request generates max_tokens (checked later)
    return {"tokens_per_s": tokens / elapsed, "seconds": elapsed, "results": results}


def stream_stats(results: list) -> dict:
    """Time to first text, gaps between text chunks and text of each stream: lean streams are parsed here, after
    the run and outside its CPU accounting."""
    parsed = [(r.first_s, r.gaps_s, text_of(r)) if isinstance(r, StreamResult) else r for r in results]
    return {
        "first_chunk_s": [p[0] for p in parsed],
        "inter_chunk_s": [g for p in parsed for g in p[1]],
        "texts": [p[2] for p in parsed],
    }


def text_of(result: StreamResult) -> str:
    """A lean stream's text, after checking its usage and finish reason (parsed after the run)."""
    texts, reasons, usage = result.texts()
    if reasons != {0: "length"} or usage is None:
        raise RuntimeError(f"a stream ended with finish reasons {reasons} and usage {usage}")
    return texts[0]


def run_async(coroutine):
    """On uvloop where installed (as the server is), the client's own overhead being part of what is measured."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


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


def measure(url: str, pid: int, requests: list[dict], concurrency: int, client: str) -> dict:
    main_before, all_before = thread_cpu_s(pid)
    client_before = time.process_time()
    with OthersLoad(pid) as others:
        served = server_run(url, requests, concurrency, client)
    served["others"] = others.share
    main_after, all_after = thread_cpu_s(pid)
    client_cpu = time.process_time() - client_before
    served |= stream_stats(served.pop("results"))
    events = len(served["inter_chunk_s"]) + len(requests)
    served["http_cpu_us_per_event"] = 1e6 * (main_after - main_before) / events
    served["client_cpu_us_per_event"] = 1e6 * client_cpu / events
    return served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="offline and server runs alternate; medians")
    parser.add_argument("--stream-interval", type=int, default=1)
    parser.add_argument("--server-threads", type=int, default=torch.get_num_threads(), help="calm serve --threads")
    parser.add_argument("--client", choices=["lean", "openai"], default="lean", help="the load generator")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    server_args = ["--threads", str(args.server_threads), "--stream-interval", str(args.stream_interval)]
    process, url = start_server(server_args)
    rows = []
    try:
        for concurrency in args.concurrency:
            requests = make_requests(concurrency * args.requests_per_client, args.max_tokens)
            server_run(url, requests[:concurrency], concurrency, args.client)  # warm-up: connections, first steps
            offline, offline_same, runs, expected, others = [], [], [], None, []
            for _ in range(args.repeats):
                meter = OthersLoad(process.pid)
                tokens_per_s, texts = offline_run(requests, concurrency, default_threads, meter)
                offline.append(tokens_per_s)
                others.append(meter.share)
                expected = expected or texts
                if args.server_threads != default_threads:
                    offline_same.append(
                        offline_run(requests, concurrency, args.server_threads, OthersLoad(process.pid))[0]
                    )
                runs.append(measure(url, process.pid, requests, concurrency, args.client))
                others.append(runs[-1].pop("others"))
                wrong = [i for i, (a, b) in enumerate(zip(runs[-1].pop("texts"), expected, strict=True)) if a != b]
                if wrong:
                    raise RuntimeError(f"{len(wrong)} streams differ from LLM.generate's text, e.g. request {wrong[0]}")
            served = statistics.median(r["tokens_per_s"] for r in runs)
            row = {
                "concurrency": concurrency,
                "requests": len(requests),
                "offline_tok_s": statistics.median(offline),
                "offline_server_threads_tok_s": statistics.median(offline_same or offline),
                "server_tok_s": served,
                "ratio": served / statistics.median(offline),
                "runs": [
                    {"offline_tok_s": o, "server_tok_s": r["tokens_per_s"]} for o, r in zip(offline, runs, strict=True)
                ],
                "ttfc_ms": percentiles([x for r in runs for x in r["first_chunk_s"]]),
                "itl_ms": percentiles([x for r in runs for x in r["inter_chunk_s"]]),
                "http_cpu_us_per_event": statistics.median(r["http_cpu_us_per_event"] for r in runs),
                "client_cpu_us_per_event": statistics.median(r["client_cpu_us_per_event"] for r in runs),
                "others_cpu_share_max": max(others),
            }
            rows.append(row)
            ttfc, itl = row["ttfc_ms"], row["itl_ms"]
            pairs = " ".join(f"{r['server_tok_s'] / r['offline_tok_s']:.2f}" for r in row["runs"])
            print(
                f"c={concurrency:3d} x{len(requests):4d}: offline {row['offline_tok_s']:6.0f} tok/s "
                f"({default_threads} threads; {row['offline_server_threads_tok_s']:.0f} at {args.server_threads}), "
                f"server {served:6.0f} tok/s, ratio {row['ratio']:.2f} (runs {pairs}) | first chunk p50/p90/p99 "
                f"{ttfc['p50']:.1f}/{ttfc['p90']:.1f}/{ttfc['p99']:.1f} ms | inter-chunk {itl['p50']:.1f}/"
                f"{itl['p90']:.1f}/{itl['p99']:.1f} ms | CPU/event: loop {row['http_cpu_us_per_event']:.0f} us, "
                f"client {row['client_cpu_us_per_event']:.0f} us | others took up to {max(others):.0%} of the CPU",
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
