"""Peak memory per process while saving (and loading) an encoder-training checkpoint: sharded DCP
checkpoints against the single-file format that gathers every row.

    python benchmarks/bench_checkpoint.py            # 10k, 100k and 200k classes, 2 gloo processes
    python benchmarks/bench_checkpoint.py --quick    # 100k classes only

State per configuration (what `training.encoder` holds for the head): a PCO head in stage 2 with
C x 512 class centres and feature bank, the centres' AdamW moments, plus a small replicated
"backbone" (one 512 x 512 linear layer) and its AdamW state, split over 2 gloo processes.

    single_file   today's format: every row-sharded tensor (centres, bank, both moments) is gathered
                  to full C rows on every rank (`gather_rows`), rank 0 torch.saves one file;
    sharded       `training.sharded_checkpoint`: torch.distributed.checkpoint, each rank writes its
                  own rows, nothing is gathered.

Each configuration runs in fresh spawned processes. The kernel's resident high-water mark (VmHWM) is
reset just before the save (and again before the load into a fresh task), so peak minus the RSS at that
point is the extra memory the operation needs on that rank. Results go to
benchmarks/results/checkpoints.md with ratios to single_file.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _memory import reset_peak_rss, status_bytes
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lvface_mm.losses import PCOHead  # noqa: E402
from training.checkpoint import (  # noqa: E402
    CheckpointManager,
    gather_rng,
    load_model_state,
    load_optimizer_state,
    model_state,
    optimizer_state,
    read_checkpoint,
)
from training.sharded_checkpoint import FORMAT, load_sharded, read_meta  # noqa: E402

D = 512
WORLD = 2


class Task(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(D, D)
        self.head = PCOHead(D, num_classes, sample_rate=1.0, stage=2)

    def sharded_modules(self) -> dict[str, nn.Module]:
        return {"head": self.head}


def _reset_peak() -> int:
    gc.collect()  # the previous phase's garbage is not this phase's memory
    return reset_peak_rss()


def _build(num_classes: int) -> tuple[Task, torch.optim.Optimizer]:
    task = Task(num_classes)
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-3)
    return task, optimizer


def _worker(rank: int, port: int, layout: str, num_classes: int, directory: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        task, optimizer = _build(num_classes)
        for p in task.parameters():
            p.grad = torch.full_like(p, 1e-3)
        optimizer.step()  # the AdamW moments exist, as in a real run
        optimizer.zero_grad(set_to_none=True)
        manager = CheckpointManager(directory, layout=layout)
        dist.barrier()
        base = _reset_peak()
        start = time.perf_counter()
        if layout == "sharded":
            meta = {"format": FORMAT, "progress": {"step": 1}, "rng": gather_rng()}
            path = manager.save_sharded(task, optimizer, meta, 1)
        else:  # what Trainer.save_checkpoint does for a single file
            payload = {"format": "lvface_mm.training/1", "model": model_state(task),
                       "optimizer": optimizer_state(optimizer, task), "rng": gather_rng()}
            path = manager.save(payload, 1) if rank == 0 else manager.path_for(1)
            del payload
            dist.barrier()
        save_s = time.perf_counter() - start
        save_peak = status_bytes("VmHWM") - base
        del task, optimizer
        task, optimizer = _build(num_classes)  # a fresh run resuming
        dist.barrier()
        base = _reset_peak()
        start = time.perf_counter()
        if layout == "sharded":
            load_sharded(task, optimizer, path, read_meta(path))
        else:
            payload = read_checkpoint(path)
            load_model_state(task, payload["model"])
            load_optimizer_state(optimizer, task, payload["optimizer"])
            del payload
        load_s = time.perf_counter() - start
        load_peak = status_bytes("VmHWM") - base
        size = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() \
            else Path(path).stat().st_size
        Path(out, f"rank{rank}.txt").write_text(f"{save_peak} {load_peak} {save_s} {load_s} {size}")
        del task, optimizer
    finally:
        gc.collect()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(layout: str, num_classes: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        directory, out = Path(tmp, "checkpoints"), Path(tmp, "out")
        out.mkdir()
        mp.start_processes(_worker, args=(_free_port(), layout, num_classes, str(directory), str(out)),
                           nprocs=WORLD, start_method="spawn")
        ranks = [list(map(float, Path(out, f"rank{r}.txt").read_text().split())) for r in range(WORLD)]
        shutil.rmtree(directory, ignore_errors=True)
    mb = 1 << 20
    return {"save_mb": [r[0] / mb for r in ranks], "load_mb": [r[1] / mb for r in ranks],
            "save_s": max(r[2] for r in ranks), "load_s": max(r[3] for r in ranks), "size_mb": ranks[0][4] / mb}


def _machine() -> tuple[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor(), ""
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"
    flags = fields.get("Flags", "").split()
    wanted = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return name, " ".join(wanted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k classes only")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "checkpoints.md")
    args = parser.parse_args(argv)
    classes_list = (100_000,) if args.quick else (10_000, 100_000, 200_000)
    load_before = os.getloadavg()
    rows = []
    for classes in classes_list:
        results = {layout: measure(layout, classes) for layout in ("single_file", "sharded")}
        ref = results["single_file"]
        for layout, r in results.items():
            rows.append((classes, layout, r, max(r["save_mb"]) / max(max(ref["save_mb"]), 1e-9),
                         max(r["load_mb"]) / max(max(ref["load_mb"]), 1e-9)))
            print(classes, layout, {k: v for k, v in r.items()}, flush=True)
    load = f"load average {load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    name, flags = _machine()
    command = " ".join(["python benchmarks/bench_checkpoint.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        "# Checkpoints: sharded (torch.distributed.checkpoint) vs single file (rows gathered)",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Machine: {name}; lscpu flags: {flags}; torch {torch.__version__}; 1 torch thread per process; {load}  ",
        f"State: PCO head in stage 2 (C x {D} centres and bank) + AdamW moments of the centres + a {D}x{D} linear "
        f"backbone with its AdamW state, on {WORLD} gloo processes. Peak = VmHWM (reset just before the "
        "operation) minus the RSS at that point, per rank; ratios compare the larger rank with single_file.",
        "",
        "| classes | format | save peak MB rank 0 / 1 | x single_file | load peak MB rank 0 / 1 | x single_file "
        "| save s | load s | on disk MB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for classes, layout, r, save_x, load_x in rows:
        lines.append(
            f"| {classes:,} | {layout} | {r['save_mb'][0]:.0f} / {r['save_mb'][1]:.0f} | {save_x:.3f} | "
            f"{r['load_mb'][0]:.0f} / {r['load_mb'][1]:.0f} | {load_x:.2f} | {r['save_s']:.2f} | {r['load_s']:.2f} | "
            f"{r['size_mb']:.0f} |"
        )
    per_tensor = 100_000 * D * 4 / (1 << 20)
    lines += [
        "",
        f"For scale: one 100k x {D} fp32 tensor is {per_tensor:.0f} MB; the head's row-sharded state is 4 of them "
        "(centres, bank, two AdamW moments), half of it on each rank. The single-file save holds all 4 gathered on "
        "every rank (plus torch.save's buffers on rank 0); the sharded save writes each rank's own rows from where "
        "they are. Timings are wall-clock on a shared, loaded machine: compare the two formats of one class "
        "count only.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
