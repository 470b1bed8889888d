"""Search at scale: the on-disk index (PQ fast-scan + exact re-ranking from memory-mapped float16
vectors) at 100k, 1M and 10M identities, next to exact search and IVF on the same data.

    python benchmarks/bench_search_scale.py --quick                # 100k and 1M, 300 + 100 queries
    python benchmarks/bench_search_scale.py --sizes 10000000       # 10M (~10 GB of float16 on disk)

Data: identity-clustered, as a face encoder produces it. Templates are random unit vectors: a
trained face encoder spreads identities nearly uniformly over the sphere, so two different people
score cosine ~0 +- 1/sqrt(512) = 0.044 (impostor scores of ArcFace-family models centre on 0).
Genuine queries are "another photo" of an enrolled person: normalise(c * t + sqrt(1 - c^2) * u),
u a random unit vector orthogonal to the template t, so cos(query, t) = c exactly, with c drawn from
N(0.55, 0.1) clipped to [0.25, 0.95]: the issue's distribution; it puts the bulk of genuine pairs
above the 0.35-0.6 thresholds downstream LVFace users pick (reference/lvface.md section 9) and a
low-quality tail down to 0.25, where at 10M identities even exact search meets its best impostor
(expected maximum of N impostor cosines ~ sqrt(2 ln N / 512): 0.21 at 100k, 0.25 at 10M).
Impostor queries are random unit vectors of people not enrolled.

Each size is built once into --workdir, then a fresh process opens it (start time), answers every
query one at a time on one thread (p50 / p99 wall and CPU time) and reports its memory. Recall@1 =
the returned top-1 equals exact search's top-1 over the same float32 templates.

Writes benchmarks/results/search.md (and prints it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "search.md"
DIM = 512
CHUNK = 262_144


# ----------------------------------------------------------------------------- data
def template_chunks(n: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, unit templates) in chunks, each chunk from its own seed: a second pass regenerates them."""
    for c, start in enumerate(range(0, n, CHUNK)):
        rng = np.random.default_rng([seed, c])
        x = rng.standard_normal((min(CHUNK, n - start), DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield np.arange(start, start + len(x), dtype=np.int64), x


def genuine_queries(templates: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Queries at cosine c ~ clip(N(0.55, 0.1), 0.25, 0.95) to their template; returns (queries, c)."""
    c = np.clip(rng.normal(0.55, 0.1, len(templates)), 0.25, 0.95).astype(np.float32)
    u = rng.standard_normal(templates.shape, dtype=np.float32)
    u -= (u * templates).sum(1, keepdims=True) * templates
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return c[:, None] * templates + np.sqrt(1 - c[:, None] ** 2) * u, c


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ----------------------------------------------------------------------------- measuring process
def rss_mib() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def measure(args: argparse.Namespace) -> None:
    """Runs in a fresh process: open the index, time single queries, report memory."""
    import faiss

    from lvface_mm.gallery.disk_index import DiskIndex

    faiss.omp_set_num_threads(1)
    queries = np.load(args.queries_file)
    before = rss_mib()
    t0 = time.perf_counter()
    index = DiskIndex.open(args.measure)
    start_s = time.perf_counter() - t0
    after_open = rss_mib()
    out = {"start_s": start_s, "encoded_at_open": index.encoded_at_open, "rss_before": before,
           "rss_open": after_open, "runs": []}
    stage = index._stage
    ours = getattr(stage, "_fast", None)
    # (re-rank, fast-scan block size): every re-rank asked for, plus the largest with FAISS's default
    # blocks of 32 rows (--compare-bbs), side by side in this process.
    variants = [(rerank, None, 1) for rerank in args.rerank]
    if args.compare_bbs and ours is not None and args.compare_bbs != ours.bbs:
        variants.append((max(args.rerank), faiss.IndexPQFastScan(stage._codes(), args.compare_bbs), 1))
    if args.scan_threads > 1 and ours is not None:  # the same index scanned in parts on several threads
        variants.append((max(args.rerank), None, args.scan_threads))
    runs = [{"rerank": r, "bbs": int(f.bbs) if f is not None else int(getattr(ours, "bbs", 0)), "threads": t,
             "wall": [], "cpu": [], "scan": [], "ids": [], "scores": []} for r, f, t in variants]
    # Interleaved in blocks of 50 queries (every variant answers block b before any answers block
    # b+1): on a shared machine the load drifts during a run, and this keeps the comparison fair.
    # Not query by query: variants that scan different copies of the codes (--compare-bbs,
    # --scan-threads) would then evict each other's 31 MiB of codes from the 32 MiB L3 cache at every
    # query, which a server answering with one index never does (at 1M, 2 scan threads measured
    # p50 3.7 ms alone and 5.1-5.5 ms alternated query by query with the 1-thread copy).
    stream = np.concatenate([queries[:5], queries])  # 5 warm-up queries first
    blocks = [(lo, stream[lo : lo + 50]) for lo in range(0, len(stream), 50)]
    for (rerank, fast, threads), run, (lo, block) in ((v, r, b) for b in blocks for v, r in zip(variants, runs)):
        for j, q in enumerate(block, start=lo):
            index.set_rerank(rerank)
            index.set_scan_threads(threads)
            if ours is not None:
                stage._fast = fast if fast is not None else ours
            # The candidate stage alone first (the same call search makes), then the whole search.
            s0 = time.thread_time()
            stage.candidates(q[None], 1, index._ids)
            scan = time.thread_time() - s0
            w0, c0 = time.perf_counter(), time.thread_time()
            s, i = index.search(q[None], 1)
            c1, w1 = time.thread_time(), time.perf_counter()
            if j >= 5:
                run["scan"].append(scan)
                run["cpu"].append(c1 - c0)
                run["wall"].append(w1 - w0)
                run["ids"].append(int(i[0, 0]))
                run["scores"].append(float(s[0, 0]))
    if ours is not None:
        stage._fast = ours
    out["runs"] = runs
    out["rss_end"] = rss_mib()
    Path(args.out).write_text(json.dumps(out))


def measure_gallery(args: argparse.Namespace) -> None:
    """Runs in a fresh process: reopen a GalleryIndex over its gallery (memory-map + catch-up check)."""
    from lvface_mm.gallery.disk_sync import GalleryIndex

    t0 = time.perf_counter()
    index = GalleryIndex(args.measure_gallery, args.gallery_db)
    start_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    hit = index.search(np.load(args.queries_file)[:1], 1)[0][0]
    first_s = time.perf_counter() - t1
    Path(args.out).write_text(json.dumps({"start_s": start_s, "first_query_s": first_s, "name": hit.name,
                                          "rebuilt": index.last_sync.rebuilt, "added": index.last_sync.added,
                                          "sync_s": index.last_sync.seconds}))


def bench_gallery_restart(n: int, args: argparse.Namespace) -> dict:
    """A gallery of ``n`` identities (rows written straight into its SQLite schema: enrolling one at a
    time would take hours), its GalleryIndex built once, then reopened in a fresh process."""
    import sqlite3
    import warnings

    from lvface_mm.gallery import Gallery
    from lvface_mm.gallery.disk_sync import GalleryIndex

    root = Path(args.workdir) / f"gallery{n}"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    db = root / "people.db"
    Gallery(db, feature_dim=DIM, index="exact").close()
    conn = sqlite3.connect(db)
    now = time.time()
    for ids, x in template_chunks(n, args.seed):
        conn.executemany("INSERT INTO identities (id, name, template, metadata, created_at, updated_at) "
                         "VALUES (?, ?, ?, '{}', ?, ?)",
                         ((int(i) + 1, f"person {i}", v.astype("<f4").tobytes(), now + 1e-3 * i, now + 1e-3 * i)
                          for i, v in zip(ids, x)))
        conn.commit()
    conn.close()
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GalleryIndex(root / "people.idx", db).close()
    first_build = time.perf_counter() - t
    _, x = next(template_chunks(n, args.seed))
    qfile, out = root / "q.npy", root / "r.json"
    np.save(qfile, x[:1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, __file__, "--measure-gallery", str(root / "people.idx"), "--gallery-db", str(db),
                    "--queries-file", str(qfile), "--out", str(out)], check=True, env=env)
    result = {"n": n, "first_build_s": first_build, "db_gib": db.stat().st_size / 2**30,
              **json.loads(out.read_text())}
    if not args.keep:
        shutil.rmtree(root)
    return result


# ----------------------------------------------------------------------------- baselines
def time_single(search, queries: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """p50 / p99 wall ms and CPU p50 ms of one-query-at-a-time ``search(q) -> top-1 id``, and the ids."""
    lat, cpu, found = [], [], []
    for q in queries:
        t, c = time.perf_counter(), time.thread_time()
        found.append(search(q[None]))
        cpu.append(time.thread_time() - c)
        lat.append(time.perf_counter() - t)
    lat_ms = np.array(lat) * 1e3
    return (float(np.median(lat_ms)), float(np.percentile(lat_ms, 99)), float(np.median(cpu) * 1e3),
            np.array(found))


def baselines(templates: np.ndarray, queries: np.ndarray, truth: np.ndarray, ivf: bool) -> list[dict]:
    import faiss

    faiss.omp_set_num_threads(1)
    rows = []
    flat = faiss.IndexFlatIP(DIM)
    flat.add(templates)
    sub = queries[:20]  # exact search is slow: a few queries give its latency
    p50, p99, cpu, found = time_single(lambda q: flat.search(q, 1)[1][0, 0], sub)
    rows.append({"index": "exact (FAISS IndexFlatIP, in memory)", "p50": p50, "p99": p99, "cpu_p50": cpu,
                 "recall": float((found == truth[: len(sub)]).mean()), "queries": len(sub), "build_s": 0.0})
    flat.reset()
    if ivf:
        nlist = 4096 if len(templates) >= 500_000 else 1024
        t = time.perf_counter()
        quantizer = faiss.IndexFlatIP(DIM)
        index = faiss.IndexIVFFlat(quantizer, DIM, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = templates[np.random.default_rng(1).choice(len(templates), min(len(templates), 64 * nlist), False)]
        index.train(sample)
        index.add(templates)
        build = time.perf_counter() - t
        faiss.omp_set_num_threads(1)
        for nprobe in (16, 64):
            index.nprobe = nprobe
            p50, p99, cpu, found = time_single(lambda q: index.search(q, 1)[1][0, 0], queries)
            rows.append({"index": f"IVF{nlist},Flat nprobe {nprobe} (in memory)", "p50": p50, "p99": p99,
                         "cpu_p50": cpu,
                         "recall": float((found == truth).mean()), "queries": len(queries), "build_s": build})
    return rows


# ----------------------------------------------------------------------------- one size
def run_size(n: int, args: argparse.Namespace) -> dict:
    import faiss

    from lvface_mm.gallery.disk_index import DiskIndex, DiskIndexConfig

    faiss.omp_set_num_threads(1)  # OpenMP threads spin against the other jobs on a shared machine
    rng = np.random.default_rng(n)
    who = np.sort(rng.choice(n, args.queries, replace=False))
    path = Path(args.workdir) / f"n{n}"
    reuse = args.reuse and (path / "manifest.json").is_file()
    if path.exists() and not reuse:
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picked: list[np.ndarray] = []
    keep_all = n <= args.baseline_max
    kept: list[np.ndarray] = []

    def feed() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for ids, x in template_chunks(n, args.seed):
            picked.append(x[who[(who >= ids[0]) & (who <= ids[-1])] - ids[0]])
            if keep_all:
                kept.append(x)
            yield ids, x

    t, c = time.perf_counter(), time.process_time()
    if reuse:  # the same seeded templates are in it: only the query picks are regenerated
        for _ in feed():
            pass
        build_s = build_cpu = float("nan")
        print(f"  reusing the {n:,} index in {path}", flush=True)
    else:
        DiskIndex.build(path, DIM, feed(), DiskIndexConfig(pq_m=64, rerank=max(args.rerank))).close()
        build_s, build_cpu = time.perf_counter() - t, time.process_time() - c
        print(f"  built {n:,} in {build_s:.1f} s", flush=True)
    gen, cos = genuine_queries(np.concatenate(picked), rng)
    imp = unit(rng, args.impostors)
    queries = np.concatenate([gen, imp]).astype(np.float32)

    # Exact truth over the float32 templates (a second pass over the regenerated chunks).
    best_s = np.full(len(queries), -np.inf, np.float32)
    best_i = np.full(len(queries), -1, np.int64)
    for ids, x in template_chunks(n, args.seed) if not keep_all else zip([np.arange(n)], [np.concatenate(kept)]):
        s = queries @ x.T
        j = s.argmax(1)
        top = s[np.arange(len(queries)), j]
        better = top > best_s
        best_s[better], best_i[better] = top[better], ids[j[better]]
    print("  exact truth done", flush=True)

    qfile, out = path.parent / f"q{n}.npy", path.parent / f"r{n}.json"
    np.save(qfile, queries)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--measure", str(path), "--queries-file", str(qfile), "--out", str(out),
           "--rerank", *map(str, args.rerank), "--compare-bbs", str(args.compare_bbs),
           "--scan-threads", str(args.scan_threads)]
    subprocess.run(cmd, check=True, env=env)
    measured = json.loads(out.read_text())
    sizes = {p.name: p.stat().st_size for p in path.iterdir()}
    g = len(gen)
    result = {"n": n, "build_s": build_s, "build_cpu_s": build_cpu, "start_s": measured["start_s"],
              "encoded_at_open": measured["encoded_at_open"], "rss": measured, "files": sizes, "runs": [],
              "exact_planted": float((best_i[:g] == who).mean()), "cos": cos.tolist(),
              "impostor_exact_max": float(best_s[g:].max()), "baselines": []}
    for run in measured["runs"]:
        ids, scores = np.array(run["ids"]), np.array(run["scores"])
        wall, cpu = np.array(run["wall"][:g]) * 1e3, np.array(run["cpu"][:g]) * 1e3
        result["runs"].append({
            "rerank": run["rerank"], "bbs": run["bbs"], "threads": run.get("threads", 1), "ids": run["ids"][:g],
            "recall": float((ids[:g] == best_i[:g]).mean()),
            "planted": float((ids[:g] == who).mean()),
            "p50": float(np.median(wall)), "p99": float(np.percentile(wall, 99)),
            "cpu_p50": float(np.median(cpu)), "cpu_p99": float(np.percentile(cpu, 99)),
            "scan_p50": float(np.median(np.array(run["scan"][:g]) * 1e3)),
            "imp_p99": float(np.percentile(np.array(run["wall"][g:]) * 1e3, 99)),
            "imp_recall": float((ids[g:] == best_i[g:]).mean()),
            "imp_score_gap": float(np.max(best_s[g:] - scores[g:])),
            "missed_cos": sorted(float(x) for x in cos[ids[:g] != best_i[:g]]),
        })
    if keep_all:
        result["baselines"] = baselines(np.concatenate(kept), queries[:g], best_i[:g], ivf=n <= args.ivf_max)
    if not args.keep:
        shutil.rmtree(path)
    qfile.unlink()
    out.unlink()
    return result


# ----------------------------------------------------------------------------- report
def machine() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
        simd = " ".join(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile"))
    except (OSError, StopIteration):
        cpu, simd = platform.processor() or "unknown CPU", "?"
    import faiss

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, SIMD flags: {simd}; load average "
            f"{os.getloadavg()[0]:.1f} at start; Python {platform.python_version()}, numpy {np.__version__}, "
            f"faiss {faiss.__version__}")


def report(args: argparse.Namespace, results: list[dict], seconds: float, started: str) -> str:
    from lvface_mm.gallery.disk_index import DiskIndexConfig

    cmd = " ".join(sys.argv[1:])
    lines = [
        "# Search at scale (on-disk index)",
        "",
        f"Command: `python benchmarks/bench_search_scale.py {cmd}`  ",
        f"Date: {started} UTC; total run {seconds / 60:.1f} min; load average at the end "
        f"{os.getloadavg()[0]:.1f}  ",
        f"Machine: {machine()}",
        "",
        f"Index: `DiskIndex` with the `pq` stage (FAISS `IndexPQFastScan`, 64 sub-quantisers x 4 bits = 32 bytes "
        f"a face, scanned in full) and exact re-ranking of the top candidates from the memory-mapped float16 "
        f"vectors. Queries: {args.queries} genuine (cosine to their template ~ clip(N(0.55, 0.1), 0.25, 0.95)) "
        f"+ {args.impostors} impostors (not enrolled), answered one at a time on one thread in a fresh process. "
        "Recall@1 = top-1 equals exact search's top-1; planted = top-1 is the person the query was made from. "
        "Latency is wall-clock (the CPU-time p50 is shown too: on this shared machine wall time includes "
        "waiting for a core).",
        "",
        "| identities | re-rank | block rows | scan threads | recall@1 | planted | exact planted | "
        "p50 (ms) | p99 (ms) | "
        "CPU p50 / p99 (ms) | of which scan, CPU p50 (ms) | impostor p99 (ms) | start (s) | "
        "RSS before open / +open / end (MiB) | on disk (GiB) | build (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        disk = sum(r["files"].values()) / 2**30
        rss = r["rss"]
        opened = rss["rss_open"]["VmRSS"] - rss["rss_before"]["VmRSS"]
        for run in r["runs"]:
            lines.append(
                f"| {r['n']:,} | {run['rerank']} | {run.get('bbs', 32)} | {run.get('threads', 1)} | "
                f"{run['recall']:.3f} | {run['planted']:.3f} | "
                f"{r['exact_planted']:.3f} | {run['p50']:.2f} | {run['p99']:.2f} | {run['cpu_p50']:.2f} / "
                f"{run['cpu_p99']:.2f} | {run.get('scan_p50', float('nan')):.2f} | {run['imp_p99']:.2f} | "
                f"{r['start_s']:.3f} | "
                f"{rss['rss_before']['VmRSS']:.0f} / {opened:.0f} / {rss['rss_end']['VmRSS']:.0f} | "
                f"{disk:.2f} | {r['build_s']:.0f} |")
    for r in results:  # the same re-rank with two block sizes: measured interleaved, so the ratio is fair
        by_rerank: dict[int, list[dict]] = {}
        for run in r["runs"]:
            by_rerank.setdefault(run["rerank"], []).append(run)
        for rerank, pair in by_rerank.items():
            if len(pair) == 2 and pair[0].get("bbs") != pair[1].get("bbs"):
                a, b = pair
                same = np.mean(np.array(a["ids"]) == np.array(b["ids"]))
                lines.append(f"\nAt {r['n']:,}, re-rank {rerank}: fast-scan blocks of {a['bbs']} rows vs {b['bbs']}: "
                             f"CPU p50 {a['cpu_p50']:.2f} vs {b['cpu_p50']:.2f} ms "
                             f"(**{b['cpu_p50'] / a['cpu_p50']:.2f}x**), CPU p99 {a['cpu_p99']:.2f} vs "
                             f"{b['cpu_p99']:.2f} ms, wall p99 {a['p99']:.2f} vs {b['p99']:.2f} ms; same top-1 for "
                             f"{same:.3f}.")
    lines += ["", "Misses (genuine queries whose top-1 differs from exact search), by the query's cosine to its "
              "template; and impostor queries: the largest amount the returned top-1 score falls below exact "
              "search's (a gap only lowers an impostor's score, so it can only turn a false accept into a reject).",
              ""]
    for r in results:
        for run in r["runs"]:
            missed = ", ".join(f"{c:.2f}" for c in run["missed_cos"][:10]) or "none"
            lines.append(f"- {r['n']:,}, re-rank {run['rerank']} (blocks of {run.get('bbs', 32)}): missed at cosine "
                         f"{missed}; impostors: exact max score {r['impostor_exact_max']:.3f}, same top-1 "
                         f"{run['imp_recall']:.2f}, largest score gap {run['imp_score_gap']:.3f}")
    base = [(r["n"], b) for r in results for b in r["baselines"]]
    if base:
        lines += ["", "## Side by side: the in-memory indexes on the same data and queries (one thread)", "",
                  "| identities | index | recall@1 | p50 (ms) | p99 (ms) | CPU p50 (ms) | queries | build (s) |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for n, b in base:
            lines.append(f"| {n:,} | {b['index']} | {b['recall']:.3f} | {b['p50']:.2f} | {b['p99']:.2f} | "
                         f"{b['cpu_p50']:.2f} | {b['queries']} | {b['build_s']:.0f} |")
        default = DiskIndexConfig().rerank
        for n, b in base:
            ours = next(r for r in results if r["n"] == n)["runs"]
            run = next((r for r in ours if r["rerank"] == default), ours[-1])
            if b["index"].startswith("exact"):
                lines.append(f"\nAt {n:,}: exact / on-disk PQ (re-rank {run['rerank']}, recall@1 {run['recall']:.3f}) "
                             f"= **{b['cpu_p50'] / run['cpu_p50']:.0f}x** in CPU p50, "
                             f"{b['p50'] / run['p50']:.0f}x in wall p50.")
    restarts = [r["gallery"] for r in results if "gallery" in r]
    if restarts:
        lines += ["", "## Restart of a `GalleryIndex` over a SQLite gallery", "",
                  "A fresh process opens the index and checks the gallery for changes (its id list and the rows "
                  "updated since the saved watermark; none here), then answers one query.", "",
                  "| identities | gallery file (GiB) | first build (s) | open + sync (s) | of which sync (s) | "
                  "first query (s) | rebuilt |", "|---:|---:|---:|---:|---:|---:|---|"]
        for g in restarts:
            lines.append(f"| {g['n']:,} | {g['db_gib']:.2f} | {g['first_build_s']:.1f} | {g['start_s']:.3f} | "
                         f"{g['sync_s']:.3f} | {g['first_query_s']:.3f} | {g['rebuilt']} |")
    lines += ["", "Files: " + "; ".join(
        f"{r['n']:,}: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in sorted(r["files"].items()))
        for r in results)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k and 1M, 300 genuine + 100 impostor queries")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], help="comma-separated sizes")
    parser.add_argument("--queries", type=int, help="genuine queries per size")
    parser.add_argument("--impostors", type=int, default=100)
    parser.add_argument("--rerank", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--compare-bbs", type=int, default=0, help="also measure the largest re-rank with "
                        "fast-scan blocks of this many rows (e.g. 64; the index uses FAISS's default 32)")
    parser.add_argument("--scan-threads", type=int, default=1,
                        help="also measure the largest re-rank with the PQ codes scanned on this many threads "
                             "(DiskIndexConfig.scan_threads); its CPU columns count the calling thread only")
    parser.add_argument("--workdir", default="/tmp/lvface_bench_search")
    parser.add_argument("--baseline-max", type=int, default=1_000_000, help="in-memory baselines up to this size")
    parser.add_argument("--ivf-max", type=int, help="IVF baseline up to this size (default: 100k quick, 1M full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the built indexes in --workdir")
    parser.add_argument("--reuse", action="store_true",
                        help="measure an index kept by an earlier --keep run of the same size and seed (no build)")
    parser.add_argument("--no-write", action="store_true", help="print the report, do not write results/search.md")
    parser.add_argument("--append", action="store_true", help="add this run's report to results/search.md "
                        "(e.g. the 10M run after the --quick one) instead of replacing it")
    parser.add_argument("--gallery-max", type=int, help="GalleryIndex restart measured up to this size (1M)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--measure-gallery", help=argparse.SUPPRESS)
    parser.add_argument("--gallery-db", help=argparse.SUPPRESS)
    parser.add_argument("--queries-file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return
    if args.measure_gallery:
        measure_gallery(args)
        return
    if not args.sizes:
        args.sizes = [100_000, 1_000_000] if args.quick else [100_000, 1_000_000, 10_000_000]
    args.queries = args.queries or (300 if args.quick else 1000)
    args.ivf_max = args.ivf_max if args.ivf_max is not None else (100_000 if args.quick else 1_000_000)
    args.gallery_max = args.gallery_max if args.gallery_max is not None else 1_000_000
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    t0 = time.perf_counter()
    results = []
    for n in args.sizes:
        print(f"{n:,} identities", flush=True)
        results.append(run_size(n, args))
        if n <= args.gallery_max:
            results[-1]["gallery"] = bench_gallery_restart(n, args)
        print(report(args, results[-1:], time.perf_counter() - t0, started), flush=True)
    text = report(args, results, time.perf_counter() - t0, started)
    print(text)
    print(f"peak RSS of the benchmark process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.append and RESULTS.exists():
        text = RESULTS.read_text() + "\n" + text.replace("# Search at scale (on-disk index)", "## Another run", 1)
    if not args.no_write:
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
