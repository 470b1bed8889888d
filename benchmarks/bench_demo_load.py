"""The demo under load, before and after issue 14: latency at 8 and 16 concurrent users, broken
thumbnail downloads, "Queue is full" at 120 queued requests, and what stays in the upload cache.

    python benchmarks/bench_demo_load.py --quick      # 3 rounds per user
    python benchmarks/bench_demo_load.py              # 10 rounds per user

Both servers run `--tiny` (random tiny models, so the numbers are about serving, not about model
quality) on 127.0.0.1 in their own process, with the committed portraits indexed. "before" is
`demos/app.py` of the commit given by --baseline (default: the last one before the demo moved into
the package), launched as that commit's CLI did; "after" is `lvface-mm demo --tiny` of this tree.

One user = one gradio_client with files not downloaded; each round runs the same text search as
every other user and then fetches every result thumbnail over HTTP, and checks that the bytes
decode as an image (a file rewritten while served comes back truncated). Round latency = search
+ thumbnails. Then 120 searches are submitted at once, and 4 uploads are cut off after 1 MiB of a
declared 5 MiB; the cache folder is counted right away and again after the "after" server's sweep
interval. Writes benchmarks/results/demo.md (and prints it).
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PORTRAITS = ROOT / "tests" / "data" / "portraits"
RESULTS = ROOT / "benchmarks" / "results" / "demo.md"
BASELINE = "9e0d850"  # the last commit with the demo app in demos/app.py
QUERY = "a portrait"
SWEEP_S = 20  # the "after" server deletes cache files older than this (--keep-minutes 0.33), every 3 s


# ---------------------------------------------------------------- the two servers (run in a child process)
def serve(kind: str, port: int, cache: Path, db: Path, baseline: str) -> None:
    os.environ["GRADIO_TEMP_DIR"] = str(cache)  # each server counts its own cache
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    if kind == "after":
        from lvface_mm.cli import build_parser
        from lvface_mm.cli.demo import build_from_args

        args = build_parser().parse_args(["demo", "--tiny", "--db", str(db), "--port", str(port),
                                          "--photos", str(PORTRAITS), "--keep-minutes", str(SWEEP_S / 60)])
        demo, launch = build_from_args(args)
    else:
        import importlib.util

        from lvface_mm.gallery.workbench import Workbench, WorkbenchConfig

        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{baseline}:demos/app.py"], check=True,
                                capture_output=True, text=True).stdout
        path = cache.parent / "baseline_app.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("baseline_app", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        workbench = Workbench(WorkbenchConfig(db=str(db), tiny=True))
        workbench.index_photos([str(PORTRAITS)])
        demo = module.build_demo(workbench=workbench)
        launch = {"server_name": "127.0.0.1", "server_port": port, "allowed_paths": [], "show_error": False,
                  "quiet": True}
    demo.launch(**launch, prevent_thread_lock=True)
    print("READY", flush=True)
    while True:
        time.sleep(3600)


# ---------------------------------------------------------------- clients
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind: str, workdir: Path, baseline: str) -> tuple[subprocess.Popen, str, Path]:
    port, cache, db = free_port(), workdir / kind / "cache", workdir / kind / "demo.db"
    cache.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port), "--cache", str(cache),
                             "--db", str(db), "--baseline", baseline], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    deadline = time.monotonic() + 300
    for line in proc.stdout:  # bounded: the child prints READY once, or exits
        if line.strip() == "READY" or time.monotonic() > deadline:
            break
    if proc.poll() is not None:
        raise RuntimeError(f"the {kind} server did not start")
    return proc, f"http://127.0.0.1:{port}/", cache


def endpoint(kind: str) -> str:
    return "/search" if kind == "after" else "/do_search"  # the baseline's endpoint is named after its function


def fetch_ok(http: object, url: str) -> bool:
    from PIL import Image

    try:
        r = http.get(url, timeout=60)
        if r.status_code != 200:
            return False
        with Image.open(io.BytesIO(r.content)) as im:
            im.load()
        return True
    except Exception:
        return False


def run_users(kind: str, url: str, users: int, rounds: int) -> dict[str, float]:
    import httpx
    from gradio_client import Client

    clients = [Client(url, download_files=False, verbose=False) for _ in range(users)]
    latencies: list[float] = []
    counts = {"downloads": 0, "broken": 0, "errors": 0}
    lock = threading.Lock()
    barrier = threading.Barrier(users)

    def user(client: Client) -> None:
        with httpx.Client() as http:
            barrier.wait()
            for _ in range(rounds):
                t0 = time.perf_counter()
                try:
                    items, _ = client.predict(QUERY, None, api_name=endpoint(kind))
                except Exception:
                    with lock:
                        counts["errors"] += 1
                    continue
                urls = [item["image"]["url"] if isinstance(item["image"], dict) else item["image"].url
                        for item in items]
                ok = [fetch_ok(http, u) for u in urls]
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    counts["downloads"] += len(ok)
                    counts["broken"] += ok.count(False)

    threads = [threading.Thread(target=user, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(1800)
    for c in clients:
        c.close()
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else [float("nan")] * 19
    return {"p50": statistics.median(latencies) if latencies else float("nan"), "p95": q[18], **counts}


def burst(kind: str, url: str, n: int = 120) -> dict[str, int]:
    from gradio_client import Client

    client = Client(url, download_files=False, verbose=False, max_workers=n + 10)
    jobs = [client.submit(QUERY, None, api_name=endpoint(kind)) for _ in range(n)]
    full = failed = 0
    for job in jobs:
        try:
            job.result(timeout=1800)
        except Exception as exc:
            if "queue is full" in str(exc).lower():
                full += 1
            else:
                failed += 1
    client.close()
    return {"queue_full": full, "failed": failed}


def cut_off_uploads(url: str, n: int = 4, declared: int = 5 << 20, sent: int = 1 << 20) -> None:
    """Start n multipart uploads of `declared` bytes and hang up after `sent` (a closed browser tab)."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    boundary = "lvfacebenchboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode()
    for _ in range(n):
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall((f"POST /gradio_api/upload HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
                       f"boundary={boundary}\r\nContent-Length: {declared}\r\n\r\n").encode() + head)
            s.sendall(os.urandom(sent))
            time.sleep(0.5)  # let the server write what it got


def cache_size(cache: Path) -> tuple[int, float]:
    files = [p for p in cache.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files) / 2**20


# ---------------------------------------------------------------- report
def machine() -> str:
    flags = ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
        have = next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split()
        flags = ", ".join(f for f in ("avx2", "fma", "avx512f", "amx_tile") if f in have)
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{model}, {os.cpu_count()} cores ({flags}); Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds per user instead of 10")
    ap.add_argument("--users", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--baseline", default=BASELINE, help="commit whose demos/app.py is 'before'")
    ap.add_argument("--serve", choices=["before", "after"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.cache, args.db, args.baseline)
        return
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    rounds = 3 if args.quick else 10
    load_start = os.getloadavg()[0]
    t_start = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="lvface-bench-demo-"))
    rows: dict[str, dict] = {}
    try:
        for kind in ("before", "after"):
            proc, url, cache = start_server(kind, workdir, args.baseline)
            try:
                rows[kind] = {"users": {u: run_users(kind, url, u, rounds) for u in args.users}}
                rows[kind]["burst"] = burst(kind, url)
                cut_off_uploads(url)
                rows[kind]["cache_now"] = cache_size(cache)
                time.sleep(SWEEP_S + 6)
                rows[kind]["cache_later"] = cache_size(cache)
            finally:
                proc.terminate()
                proc.wait(60)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = render(rows, args, rounds, load_start, time.time() - t_start)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print(report)


def render(rows: dict, args: argparse.Namespace, rounds: int, load_start: float, total_s: float) -> str:
    b, a = rows["before"], rows["after"]
    lines = [
        "# Demo under load",
        "",
        f"Command: `python benchmarks/bench_demo_load.py{' --quick' if args.quick else ''}`  ",
        f"Date: {datetime.date.today()}; total run {total_s / 60:.1f} min  ",
        f"Machine: {machine()}; load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at the end  ",
        f"before = `demos/app.py` at {args.baseline} (one request at a time, queue of 64, arrays saved by Gradio "
        "under a hash of their pixels, no cache cleanup); after = `lvface-mm demo --tiny` of this tree (reads 4 "
        "at a time, queue of 512, thumbnails under fresh names, swept private cache).",
        "",
        f"## Identical searches from N users ({rounds} rounds each: search + fetch every thumbnail)",
        "",
        "| users | p50 before (s) | p50 after (s) | p95 before (s) | p95 after (s) | p95 before/after | "
        "broken thumbnails before | after | errors before | after |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for u in args.users:
        x, y = b["users"][u], a["users"][u]
        lines.append(f"| {u} | {x['p50']:.2f} | {y['p50']:.2f} | {x['p95']:.2f} | {y['p95']:.2f} | "
                     f"{x['p95'] / y['p95']:.2f}x | {x['broken']}/{x['downloads']} | {y['broken']}/{y['downloads']} | "
                     f"{x['errors']} | {y['errors']} |")
    lines += [
        "",
        "## 120 searches submitted at once",
        "",
        "| | 'Queue is full' | other failures |",
        "|---|---:|---:|",
        f"| before | {b['burst']['queue_full']} | {b['burst']['failed']} |",
        f"| after | {a['burst']['queue_full']} | {a['burst']['failed']} |",
        "",
        "## Upload cache after the run and 4 uploads cut off at 1 of 5 MiB",
        "",
        f"| | files (MiB) right after | files (MiB) {SWEEP_S + 6} s later |",
        "|---|---:|---:|",
        *(f"| {kind} | {r['cache_now'][0]} ({r['cache_now'][1]:.1f}) | {r['cache_later'][0]} "
          f"({r['cache_later'][1]:.1f}) |" for kind, r in (("before", b), ("after", a))),
        "",
        f"The after server was started with `--keep-minutes {SWEEP_S / 60:.2f}` ({SWEEP_S} s) so the sweep shows "
        "within the run; the default keeps files 30 minutes and sweeps every 5. The before server never "
        "deletes: cut-off uploads stay as orphan temp files until someone empties the folder.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
