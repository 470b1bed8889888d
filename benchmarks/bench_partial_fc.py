"""Step time and peak memory of Partial FC against a plain full softmax as the class count grows.

    python benchmarks/bench_partial_fc.py            # 10k, 100k, 1M classes; 1 and 2 gloo processes
    python benchmarks/bench_partial_fc.py --quick    # 10k and 100k only, fewer steps

One training step = tiny linear "backbone" (64 -> 512) + head forward, backward and optimizer step
(AdamW; SparseAdam for the centres of the sparse variant). Heads:

    full      reference: one (C, D) weight, cosine logits, CosFace, F.cross_entropy. With 2 processes
              it is data parallel: the weight is replicated and DDP all-reduces its gradient.
    pfc r=R   lvface_mm PartialFC (CosFace), centres sharded over the processes, sample rate R.
    +sparse   the same with sparse_update=True and torch.optim.SparseAdam for the centres.

Each configuration runs in fresh forked processes, so the peak resident memory (ru_maxrss) minus the
resident memory before the head was built is that head's peak working memory per process. The
result is a markdown report (default benchmarks/results/losses.md) with ratios to `full` and a
per-process memory curve extrapolated to WebFace42M's 2,059,906 identities.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run_rank(rank: int, world: int, cfg: dict, store: str, out_dir: str) -> None:
    torch.set_num_threads(max(1, cfg["threads"] // world))
    if world > 1:
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    torch.manual_seed(rank)
    classes, batch = cfg["classes"], cfg["batch"]
    rate, sparse = HEADS[cfg["head"]]
    base = _rss_bytes()
    backbone: nn.Module = nn.Linear(IN_DIM, D)
    if cfg["head"] == "full":
        # Data parallel reference: backbone and the whole weight replicated, DDP all-reduces both.
        model: nn.Module = nn.ModuleDict({"backbone": backbone, "head": FullSoftmax(classes)})
        opts = [torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)]
        net = nn.parallel.DistributedDataParallel(_Joined(model)) if world > 1 else _Joined(model)

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return net(x, y)
    else:
        head = PartialFC(D, classes, CosFaceMargin(), rate, sparse_update=sparse)
        net = nn.parallel.DistributedDataParallel(backbone) if world > 1 else backbone  # never the head
        if sparse:
            opts = [torch.optim.AdamW(backbone.parameters(), lr=1e-3, weight_decay=0.1),
                    torch.optim.SparseAdam(head.parameters(), lr=1e-3)]
        else:
            opts = [torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.1)]

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return head(net(x), y).loss

    times = []
    for step in range(cfg["warmup"] + cfg["steps"]):
        x = torch.randn(batch, IN_DIM)
        y = torch.randint(0, classes, (batch,))
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        loss_fn(x, y).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step >= cfg["warmup"]:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"times": times, "peak": peak}, f)
    if world > 1:
        del net, loss_fn, opts  # no DDP object may outlive the process group (offline_env.md section 2)
        gc.collect()
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
    parser.add_argument("--quick", action="store_true", help="10k and 100k classes, fewer steps")
    parser.add_argument("--batch", type=int, default=64, help="samples per process and step")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, split over ranks")
    parser.add_argument("--max-full-gb", type=float, default=10.0,
                        help="skip the replicated full softmax where world * 5 * C * D * 4 bytes exceed this")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "losses.md"))
    args = parser.parse_args(argv)
    classes_list = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    warmup, steps = (1, 3) if args.quick else (1, 5)
    rows, curves = [], {}
    for world in (1, 2):
        for classes in classes_list:
            ref_ms = ref_mb = None
            for head in HEADS:
                if head == "full" and world * 5 * classes * D * 4 / 1e9 > args.max_full_gb:
                    rows.append((world, classes, head, None, None, None, None))
                    continue
                cfg = {"classes": classes, "batch": args.batch, "head": head, "warmup": warmup, "steps": steps,
                       "threads": args.threads}
                res = run_config(cfg, world)
                if head == "full":
                    ref_ms, ref_mb = res["ms"], res["peak_mb"]
                rows.append((world, classes, head, res["ms"], res["peak_mb"],
                             res["ms"] / ref_ms if ref_ms else None, res["peak_mb"] / ref_mb if ref_mb else None))
                curves.setdefault((world, head), []).append((classes, res["peak_mb"]))
                print(f"world={world} C={classes:>9,} {head:<18} {res['ms']:9.1f} ms  {res['peak_mb']:9.1f} MB",
                      flush=True)
    write_report(args, rows, curves, " ".join(["python benchmarks/bench_partial_fc.py"] + (argv or [])))


def _fmt(value: float | None, spec: str) -> str:
    return "skipped" if value is None else format(value, spec)


def write_report(args: argparse.Namespace, rows: list, curves: dict, command: str) -> None:
    lines = [
        "# Losses: Partial FC vs full softmax",
        "",
        f"Command: `{command}{' --quick' if args.quick and '--quick' not in command else ''}`  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Machine: {_machine()}; torch {torch.__version__}, {args.threads} threads split over the processes  ",
        f"Step: linear 64->512 backbone + head, forward/backward/optimizer step, {args.batch} samples per process; "
        "median step time over the timed steps (a step ends when the slowest rank finishes); peak = max over ranks "
        "of peak RSS minus RSS before the head was built. Ratios are against `full` at the same world size and C.",
        "",
        "| procs | classes | head | step ms | x full | peak MB/proc | x full |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for world, classes, head, ms, mb, r_ms, r_mb in rows:
        lines.append(f"| {world} | {classes:,} | {head} | {_fmt(ms, '.1f')} | {_fmt(r_ms, '.2f')} | "
                     f"{_fmt(mb, '.0f')} | {_fmt(r_mb, '.2f')} |")
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
