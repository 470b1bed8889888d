"""Step time and peak memory of Partial FC against a plain full softmax as the class count grows.

    python benchmarks/bench_partial_fc.py            # 10k, 100k, 1M classes; 1 and 2 gloo processes
    python benchmarks/bench_partial_fc.py --quick    # 10k and 100k only, fewer steps

One training step = tiny linear "backbone" (64 -> 512) + head forward, backward and optimizer step
(AdamW; SparseAdam for the centres of the sparse variant). Heads:

    full      reference: one (C, D) weight, cosine logits, CosFace, F.cross_entropy. With 2 processes
              it is data parallel: the weight is replicated and DDP all-reduces its gradient.
    pfc r=R   lvface_mm PartialFC (CosFace), centres sharded over the processes, sample rate R.
    +sparse   the same with sparse_update=True and torch.optim.SparseAdam for the centres.

Each configuration runs in fresh forked processes; the kernel's resident high-water mark is reset
just before the head is built, so peak minus the RSS at that point is the head's peak working memory
per process (weights, gradients, optimizer state, activations, communication buffers). The
result is a markdown report (default benchmarks/results/losses.md) with ratios to `full` and a
per-process memory curve extrapolated to WebFace42M's 2,059,906 identities.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _memory import reset_peak_rss, status_bytes
from torch import nn

from lvface_mm.losses import CosFaceMargin, PartialFC

D, IN_DIM = 512, 64
WF42M_IDS = 2_059_906
HEADS = {"full": (1.0, False), "pfc r=1.0": (1.0, False), "pfc r=0.3": (0.3, False), "pfc r=0.1": (0.1, False),
         "pfc r=0.1 +sparse": (0.1, True)}


class FullSoftmax(nn.Module):
    """The reference: a plain CosFace classifier over all classes in one matrix."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, D) * 0.01)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(emb) @ F.normalize(self.weight).T  # (B, C)
        logits = 64.0 * (cos - 0.4 * F.one_hot(labels, cos.shape[1]))
        return F.cross_entropy(logits, labels)


class _Joined(nn.Module):
    def __init__(self, model: nn.ModuleDict) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model["head"](self.model["backbone"](x), y)


def _build(head_name: str, classes: int, world: int) -> tuple[Callable, list, list]:
    """(loss_fn(x, y), optimizers, objects to free before the process group goes) for one head."""
    rate, sparse = HEADS[head_name]
    backbone: nn.Module = nn.Linear(IN_DIM, D)
    if head_name == "full":
        # Data parallel reference: backbone and the whole weight replicated, DDP all-reduces both.
        model = _Joined(nn.ModuleDict({"backbone": backbone, "head": FullSoftmax(classes)}))
        opts = [torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)]
        net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
        return (lambda x, y: net(x, y)), opts, [net]
    head = PartialFC(D, classes, CosFaceMargin(), rate, sparse_update=sparse)
    net = nn.parallel.DistributedDataParallel(backbone) if world > 1 else backbone  # never the head
    if sparse:
        opts = [torch.optim.AdamW(backbone.parameters(), lr=1e-3, weight_decay=0.1),
                torch.optim.SparseAdam(head.parameters(), lr=1e-3)]
    else:
        opts = [torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.1)]
    return (lambda x, y: head(net(x), y).loss), opts, [net, head]


def _steps(loss_fn: Callable, opts: list, classes: int, batch: int, count: int, world: int) -> list[float]:
    times = []
    for _ in range(count):
        x = torch.randn(batch, IN_DIM)
        y = torch.randint(0, classes, (batch,))
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        loss_fn(x, y).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def _fixed_mmap_threshold() -> None:
    """Make glibc return every freed block over 128 KiB to the OS at once.

    By default glibc raises its mmap threshold up to 32 MiB after the first big free and then keeps
    freed blocks below it in the heap, so the resident peak would depend on allocation history
    (r = 0.1 measured above r = 0.3). With a fixed threshold the peak follows the live tensors.
    """
    with contextlib.suppress(OSError):  # not glibc: measure as is
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD


def _run_rank(rank: int, world: int, cfg: dict, store: str, out_dir: str) -> None:
    _fixed_mmap_threshold()
    torch.set_num_threads(cfg["threads"])
    if world > 1:
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    torch.manual_seed(rank)
    # One step of a tiny copy first: it pages in the library code of every kernel the step uses
    # (hundreds of MB of resident memory that would otherwise be counted as the head's).
    warm = _build(cfg["head"], 1000, world)
    _steps(warm[0], warm[1], 1000, cfg["batch"], 1, world)
    del warm
    gc.collect()
    base = reset_peak_rss()
    loss_fn, opts, keep = _build(cfg["head"], cfg["classes"], world)
    times = _steps(loss_fn, opts, cfg["classes"], cfg["batch"], cfg["warmup"] + cfg["steps"], world)
    peak = status_bytes("VmHWM") - base
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"times": times[cfg["warmup"]:], "peak": peak}, f)
    del loss_fn, opts, keep  # no DDP object may outlive the process group (offline_env.md section 2)
    gc.collect()
    if world > 1:
        dist.destroy_process_group()


def run_config(cfg: dict, world: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_run_rank, args=(world, cfg, os.path.join(tmp, "store"), tmp), nprocs=world,
                                 start_method="fork", join=True)
        del ctx
        ranks = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    step_times = [max(ts) for ts in zip(*(r["times"] for r in ranks))]  # a step ends when the slowest rank does
    return {"ms": 1000 * statistics.median(step_times), "peak_mb": max(r["peak"] for r in ranks) / 2**20}


def estimate_bytes(head: str, classes: int, world: int) -> float:
    """Rough peak bytes per process: centre matrix (num_local x D fp32) times the live copies.

    Measured at 100k classes: Partial FC dense 5.7 copies (weight, gradient, 2 AdamW moments, optimizer
    temporaries), sparse 3.5, the full softmax 7.6 (it also normalises the whole matrix); +1 DDP bucket
    for the replicated weight.
    """
    _, sparse = HEADS[head]
    copies = 4 if sparse else 8 + (1 if world > 1 else 0) if head == "full" else 6
    rows = classes if head == "full" else -(-classes // world)
    return copies * rows * D * 4


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares a + b * C through (C, MB) points."""
    n = len(points)
    mx = sum(c for c, _ in points) / n
    my = sum(m for _, m in points) / n
    var = sum((c - mx) ** 2 for c, _ in points)
    b = sum((c - mx) * (m - my) for c, m in points) / var if var else 0.0
    return my - b * mx, b


def _machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        keep = ("Model name", "CPU(s)", "Thread(s) per core")
        fields = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.split(":")[0].strip() in keep]
        return ", ".join(fields)
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()


def gpu_projection(batch: int, rate: float, world: int) -> tuple[float, float]:
    """Per-GPU GB for WebFace42M (fp32 centres + AdamW), full data-parallel softmax vs Partial FC.

    Centres: weight + gradient + 2 AdamW moments = 16 bytes per entry; logits: about three (B, S)
    fp32 buffers live at once (cosines, margin logits, saved softmax), S = C for the replicated
    softmax and B * W * r * C / W = B * r * C entries for Partial FC.
    """
    full = (WF42M_IDS * D * 16 + 3 * batch * WF42M_IDS * 4) / 1e9
    pfc = (WF42M_IDS / world * D * 16 + 3 * batch * world * rate * WF42M_IDS / world * 4) / 1e9
    return full, pfc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k and 100k classes only (no 1M)")
    parser.add_argument("--batch", type=int, default=64, help="samples per process and step")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (1: OpenMP spinning on a busy 2-core box distorts timings)")
    parser.add_argument("--mem-fraction", type=float, default=0.8,
                        help="skip a configuration whose estimated memory exceeds this fraction of MemAvailable")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "losses.md"))
    args = parser.parse_args(argv)
    classes_list = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    rows, curves = [], {}
    load_before = os.getloadavg()
    for world in (1, 2):
        for classes in classes_list:
            ref: dict | None = None
            for head in HEADS:
                if head == "pfc r=1.0" and classes >= 1_000_000:
                    continue  # the sharded full softmax: as slow as `full`, adds nothing but minutes
                res, note = _measure(head, classes, world, args)
                print(f"world={world} C={classes:>9,} {head:<18} "
                      + (f"{res['ms']:9.1f} ms  {res['peak_mb']:9.1f} MB" if res else note), flush=True)
                if res is None:
                    rows.append((world, classes, head, None, None, None, None, note))
                    continue
                ref = res if head == "full" else ref
                rows.append((world, classes, head, res["ms"], res["peak_mb"],
                             res["ms"] / ref["ms"] if ref else None, res["peak_mb"] / ref["peak_mb"] if ref else None,
                             ""))
                curves.setdefault((world, head), []).append((classes, res["peak_mb"]))
    load = f"load average {load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    command = " ".join(["python benchmarks/bench_partial_fc.py", *(sys.argv[1:] if argv is None else argv)])
    write_report(args, rows, curves, command, load)


def _measure(head: str, classes: int, world: int, args: argparse.Namespace) -> tuple[dict | None, str]:
    """(result, "") or (None, why not): skipped for memory, or killed (the box is shared)."""
    need = world * estimate_bytes(head, classes, world)
    if need > args.mem_fraction * _mem_available():
        return None, f"skipped: needs ~{need / 1e9:.1f} GB, {_mem_available() / 1e9:.1f} GB available"
    cfg = {"classes": classes, "batch": args.batch, "head": head, "warmup": 1, "steps": 3, "threads": args.threads}
    try:
        return run_config(cfg, world), ""
    except mp.ProcessExitedException as err:  # SIGKILL = the kernel's out-of-memory killer
        return None, f"failed: {err}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_report(args: argparse.Namespace, rows: list, curves: dict, command: str, load: str) -> None:
    lines = [
        "# Losses: Partial FC vs full softmax",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Machine: {_machine()}; torch {torch.__version__}; {args.threads} torch thread(s) per process; {load}  ",
        f"Step: linear 64->512 backbone + head, forward/backward/optimizer step, {args.batch} samples per process; "
        "median step time over the timed steps (a step ends when the slowest rank finishes); peak = max over ranks "
        "of the peak resident memory (VmHWM, reset just before the head is built) minus the RSS at that point. "
        "Ratios are against `full` at the same world size and C.",
        "",
        "| procs | classes | head | step ms | x full | peak MB/proc | x full | note |",
        "|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for world, classes, head, ms, mb, r_ms, r_mb, note in rows:
        lines.append(f"| {world} | {classes:,} | {head} | {_fmt(ms, '.1f')} | {_fmt(r_ms, '.2f')} | "
                     f"{_fmt(mb, '.0f')} | {_fmt(r_mb, '.2f')} | {note} |")
    lines += ["", f"## Per-process memory extrapolated to {WF42M_IDS:,} identities (D = 512)", "",
              "Least-squares line through the measured peaks above (same batch per process):", "",
              "| procs | head | MB per 100k classes | predicted MB/proc at 2.06M |", "|---:|---|---:|---:|"]
    for (world, head), pts in sorted(curves.items()):
        if len(pts) >= 2:
            a, b = _fit(pts)
            lines.append(f"| {world} | {head} | {b * 1e5:.0f} | {a + b * WF42M_IDS:,.0f} |")
    lines += ["", "Projection for the GPU recipes (fp32 centres + AdamW = 16 bytes per centre entry, about three "
              "fp32 logit buffers of B x S):", "",
              "| GPUs | batch/GPU | r | full softmax GB/GPU (replicated) | Partial FC GB/GPU |",
              "|---:|---:|---:|---:|---:|"]
    for world, batch, rate in ((8, 128, 0.2), (64, 384, 0.3), (64, 384, 0.1)):
        full, pfc = gpu_projection(batch, rate, world)
        lines.append(f"| {world} | {batch} | {rate} | {full:.1f} | {pfc:.1f} |")
    lines += ["", "Why 2M identities fit: the centres and their optimizer state divide by the number of GPUs "
              "(16 bytes x C x D / W), and the logits are B x r x C per GPU whatever W is, so r and the per-GPU "
              "batch bound them. A replicated softmax needs all 16 bytes x C x D = 16.9 GB of state on every GPU "
              "plus B x C logits, and all-reduces a 4.2 GB gradient every step.", ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
