"""Load on `tunesmith serve`: many concurrent streaming clients for a while, some of them hanging up early.

    python bench/serve_load.py --clients 64 --seconds 60      # the embedded model on this machine's CPU

Starts `tunesmith serve builtin:smollm2-135m-instruct` on a free loopback port (with an API key), then runs the
clients with httpx: each sends streaming chat completions one after another (one of four prompts, greedy, up to
16 tokens); every tenth request hangs up after its second chunk, which must free its slot. Checked for each
completed stream: every chunk carries the stream's own id, the stream ends with [DONE], and the text of a prompt
is the same in every answer (greedy decoding of one prompt in a batch of others: anything else would be mixed
rows). Prints requests served, p50 / p99 latency and time to first token, and the counts of lost, mixed and
differing answers; exit code 1 when one was lost or mixed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict

PROMPTS = ["What is the capital of France?", "Name three colors.", "Say hello in Spanish.", "What is 2+2?"]
KEY = "sk-load-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(client, url: str, prompt: int, hang_up: bool, stats: dict) -> None:
    body = {"model": "smollm2-135m-instruct", "stream": True, "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": PROMPTS[prompt]}]}
    start, first, ids, text, done = time.perf_counter(), None, set(), [], False
    try:
        async with client.stream("POST", url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as resp:
            if resp.status_code != 200:
                stats["errors"][resp.status_code] += 1
                return
            chunks = 0
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                ids.add(chunk["id"])
                for choice in chunk.get("choices", []):
                    piece = choice.get("delta", {}).get("content") or ""
                    if piece and first is None:
                        first = time.perf_counter()  # the first text, not the role chunk sent at once
                    text.append(piece)
                chunks += 1
                if hang_up and chunks == 2:
                    stats["hung_up"] += 1
                    return
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal to the bench
        stats["errors"][type(exc).__name__] += 1
        return
    if not done:
        stats["lost"] += 1
        return
    if len(ids) != 1:
        stats["mixed"] += 1
    stats["latency"].append(time.perf_counter() - start)
    stats["ttft"].append((first or time.perf_counter()) - start)
    stats["answers"][prompt][("".join(text))] += 1


async def client_loop(n: int, url: str, until: float, stats: dict) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=300) as client:
        i = 0
        while time.perf_counter() < until:
            await one_request(client, url, (n + i) % len(PROMPTS), hang_up=(n * 7 + i) % 10 == 0, stats=stats)
            i += 1


async def run(clients: int, seconds: float, url: str) -> dict:
    stats = {"latency": [], "ttft": [], "lost": 0, "mixed": 0, "hung_up": 0, "errors": Counter(),
             "answers": defaultdict(Counter)}
    until = time.perf_counter() + seconds
    await asyncio.gather(*(client_loop(n, url, until, stats) for n in range(clients)))
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", args.model, "--port", str(port),
                               "--api-key", KEY, "--model-name", "smollm2-135m-instruct"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    try:
        import httpx

        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                print("the server did not start:", server.stderr.read()[-2000:])
                return 1
            time.sleep(0.5)
        stats = asyncio.run(run(args.clients, args.seconds, f"http://127.0.0.1:{port}/v1/chat/completions"))
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    lat, ttft = sorted(stats["latency"]), sorted(stats["ttft"])

    def pct(values, q):
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    differing = sum(sum(c.values()) - max(c.values()) for c in stats["answers"].values())
    print(f"{args.clients} clients for {args.seconds:g} s: {len(lat)} streams completed, {stats['hung_up']} hung up "
          f"early, errors {dict(stats['errors']) or 0}")
    print(f"latency p50 {pct(lat, 0.5):.2f} s, p99 {pct(lat, 0.99):.2f} s; first token p50 {pct(ttft, 0.5):.2f} s, "
          f"p99 {pct(ttft, 0.99):.2f} s; mean {statistics.mean(lat) if lat else float('nan'):.2f} s")
    print(f"lost {stats['lost']}, mixed {stats['mixed']}, answers differing from their prompt's usual one "
          f"{differing}; server: {health.get('requests')} requests in {health.get('batches')} batches, "
          f"largest batch {health.get('largest_batch')}")
    return 1 if stats["lost"] or stats["mixed"] else 0


if __name__ == "__main__":
    sys.exit(main())
