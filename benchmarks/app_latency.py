"""How long `nti app` makes a user wait: start to ready, a cache hit, an edit of a cached inversion.

    python benchmarks/app_latency.py                      # shapes, T = 50, N = 10, on the CPU

1. **Start to ready**: `nti app` is started as a user starts it (a new process, a fresh cache
   folder) `--starts` times; the time from the process's start until the page answers
   (`GET /` gives 200) and until its API answers (`GET /gradio_api/info`).
2. With the last of those apps serving, through its HTTP API (`gradio_client`, the requests the
   page makes): the first inversion of the demo image (a cache miss), then `--repeats` cache hits
   (the same image again, uploaded again) and `--repeats` edits of the cached inversion ("red" ->
   "blue", Replace, LocalBlend on "circle", the cross-attention maps and the grid included). The
   client leaves the result files on the server, as the page does until it shows them; the
   cache hit is also timed with the client downloading its three files.
3. The same cache hit and edit in this process through `Editor` (no HTTP, no page), so the two
   parts of the latency are told apart.

Prints a table and one JSON line (`--output` appends it to a file); BENCHMARKS.md records the
numbers by hand, with the date, the machine and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_IMAGE = ROOT / "configs" / "images" / "demo_red_circle.png"
DEMO_PROMPT = "a red circle on a green background"
BLUE_PROMPT = "a blue circle on a green background"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_app(args: argparse.Namespace, cache: Path) -> tuple[subprocess.Popen, str, dict[str, float]]:
    """Starts `nti app` in a new process; returns it, its URL and the seconds to page and API."""
    port = free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "PYTHONPATH": str(ROOT),
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    command = [sys.executable, "-m", "nti_lightning.cli", "app", "--port", str(port), "--cache-dir", str(cache),
               "--model.pretrained", args.model, "--trainer.accelerator", args.device,
               "--model.num_inference_steps", str(args.steps), "--model.num_inner_steps", str(args.inner_steps),
               "--threads", str(args.threads)]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    times: dict[str, float] = {}
    while "api" not in times:
        if process.poll() is not None:
            raise SystemExit(f"nti app exited with status {process.returncode}: {' '.join(command)}")
        if "page" not in times and answers(url):
            times["page"] = time.perf_counter() - started
        if "page" in times and answers(url + "gradio_api/info"):
            times["api"] = time.perf_counter() - started
        time.sleep(0.05)
    return process, url, times


def timed(call, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--device", default="cpu", help="--trainer.accelerator of the app")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="CPU threads of the model (the app's default: every core but one)")
    parser.add_argument("--steps", type=int, default=50, help="T (the app's default, 50)")
    parser.add_argument("--inner-steps", type=int, default=10, help="N (the app's default, 10)")
    parser.add_argument("--starts", type=int, default=3, help="app starts timed")
    parser.add_argument("--repeats", type=int, default=10, help="cache hits and edits timed")
    parser.add_argument("--output", type=Path, help="append the JSON line to this file")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    from gradio_client import Client, handle_file

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="nti-app-bench-"))
    starts, process = [], None
    for index in range(args.starts):
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
        process, url, times = start_app(args, work / f"cache{index}")
        starts.append(times)
        print(f"start {index + 1}: page {times['page']:.2f} s, API {times['api']:.2f} s", flush=True)
    try:
        client = Client(url, verbose=False, download_files=False)
        downloading = Client(url, verbose=False)
        image = handle_file(str(DEMO_IMAGE))

        def invert(session=client):
            return session.predict(
                image, DEMO_PROMPT, "null_text", args.steps, args.inner_steps, 7.5, api_name="/invert"
            )

        def edit():
            return client.predict(BLUE_PROMPT, "auto", 0.8, 0.7, "", "circle", 7.5, api_name="/edit")

        [first] = timed(invert, 1)
        print(f"first inversion through the API: {first:.2f} s", flush=True)
        api_hits, api_edits = timed(invert, args.repeats), timed(edit, args.repeats)
        downloaded_hits = timed(lambda: invert(downloading), args.repeats)
    finally:
        process.terminate()
        process.wait(timeout=60)

    # The same requests in this process, on the cache the app just filled.
    from nti_lightning.app import Editor, EditRequest, InversionCache, InversionSettings
    from nti_lightning.models.loading import load_pipeline

    pipeline = load_pipeline(args.model).to(args.device)
    settings = InversionSettings(num_inference_steps=args.steps, num_inner_steps=args.inner_steps)
    editor = Editor(
        pipeline, InversionCache(work / f"cache{args.starts - 1}"), accelerator=args.device, defaults=settings
    )
    request = EditRequest.from_fields(BLUE_PROMPT, "auto", 0.8, 0.7, "", "circle", 7.5)
    assert editor.invert(DEMO_IMAGE, DEMO_PROMPT).cached, "the app's inversion must be in its cache"
    key = editor.invert(DEMO_IMAGE, DEMO_PROMPT).entry.key
    editor.edit(key, request)  # the first edit of a process pays one-time costs
    direct_hits = timed(lambda: editor.invert(DEMO_IMAGE, DEMO_PROMPT), args.repeats)
    direct_edits = timed(lambda: editor.edit(key, request), args.repeats)

    median = statistics.median
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit or None,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "model": args.model,
        "device": args.device,
        "threads": args.threads,
        "steps": args.steps,
        "inner_steps": args.inner_steps,
        "start_to_page_s": median(t["page"] for t in starts),
        "start_to_api_s": median(t["api"] for t in starts),
        "first_inversion_s": first,
        "cache_hit_api_s": median(api_hits),
        "cache_hit_api_downloaded_s": median(downloaded_hits),
        "cache_hit_editor_s": median(direct_hits),
        "edit_api_s": median(api_edits),
        "edit_editor_s": median(direct_edits),
    }
    rows = [
        ("app start to ready (page / API)", f"{result['start_to_page_s']:.2f} / {result['start_to_api_s']:.2f} s"),
        ("first inversion of the demo image (API)", f"{first:.2f} s"),
        (
            "cache hit (API / API + downloads / Editor)",
            f"{result['cache_hit_api_s']:.3f} / {result['cache_hit_api_downloaded_s']:.3f} / "
            f"{result['cache_hit_editor_s']:.4f} s",
        ),
        ("edit of a cached inversion (API / Editor)", f"{result['edit_api_s']:.3f} / {result['edit_editor_s']:.3f} s"),
    ]
    print(
        f"\n{args.model}, T = {args.steps}, N = {args.inner_steps}, {args.device}, {args.threads} thread(s); medians "
        "of "
        f"{args.starts} starts and {args.repeats} requests"
    )
    for name, value in rows:
        print(f"  {name:<46} {value}")
    line = json.dumps(result)
    print(line)
    if args.output:
        with args.output.open("a") as handle:
            handle.write(line + "\n")


if __name__ == "__main__":
    main()
