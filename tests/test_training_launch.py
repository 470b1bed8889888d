"""Both training programs start the same way (`training.launch`): one command line, one config loader,
one process-group start and device choice; mistakes read the same in both."""

from __future__ import annotations

import gc
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.config import ConfigError, LoopConfig
from training.launch import ProgramArgs, launcher_precision, parse_program_args, process_group, setup_distributed


def _mains():
    from training.adapter import main as adapter_main
    from training.encoder import main as encoder_main

    return {"encoder": encoder_main, "adapter": adapter_main}


def test_command_line_forms() -> None:
    assert parse_program_args([]) == ProgramArgs(None, ())
    assert parse_program_args(["--config", "a.yaml", "--optim.lr=1"]) == ProgramArgs("a.yaml", ("--optim.lr=1",))
    args = parse_program_args(["--loop.epochs", "3", "--config=a.yaml"])
    assert args == ProgramArgs("a.yaml", ("--loop.epochs", "3"))
    assert parse_program_args(["--optim.lr=1", "-h"]).help
    with pytest.raises(ConfigError, match=r"--config needs a YAML path"):
        parse_program_args(["--config"])
    with pytest.raises(ConfigError, match=r"--config needs a YAML path"):
        parse_program_args(["--config", "--optim.lr=1"])
    with pytest.raises(ConfigError, match=r"--config given 2 times \(a.yaml, b.yaml\)"):
        parse_program_args(["--config", "a.yaml", "--config=b.yaml"])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--config"], "config error: command line: --config needs a YAML path"),
        (["optim.lr=1"], "config error: command line: expected --section.key=value, got 'optim.lr=1'"),
        (["--loop.epochs"], "config error: command line: --loop.epochs needs a value"),
        (["--loop.epochs=2.5"], "config error: command line (--loop.epochs): loop.epochs must be an integer, "
                                "got '2.5'"),
        (["--loop.precision=fp8"], "config error: command line (--loop.precision): loop.precision must be one of "
                                   "'fp32', 'bf16', 'fp16', got 'fp8'"),
        (["--checkpoint.keep_last=0"], "config error: command line (--checkpoint.keep_last): invalid 'checkpoint': "
                                       "keep_last must be >= 1, got 0"),
        (["--loop.epoch=3"], "config error: command line (--loop.epoch): unknown key 'loop.epoch' "
                             "(did you mean 'loop.epochs'?); keys allowed in 'loop': epochs, max_steps"),
        (["--config", "no/such.yaml"], "config error: config file not found: no/such.yaml"),
    ],
)
def test_both_programs_reject_the_same_bad_command_line_the_same_way(argv: list[str], expected: str) -> None:
    for name, main in _mains().items():
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert str(info.value.code).startswith(expected), (name, info.value.code)


def test_unknown_section_names_each_programs_own_sections() -> None:
    messages = {}
    for name, main in _mains().items():
        with pytest.raises(SystemExit) as info:
            main(["--optimizer.lr=1"])
        messages[name] = str(info.value.code)
    assert messages["encoder"].startswith("config error: command line (--optimizer.lr): unknown key 'optimizer'")
    assert "keys allowed in the top level: output_dir, model, head, data, optim" in messages["encoder"]
    assert "keys allowed in the top level: output_dir, stages, model, data, lora" in messages["adapter"]


def test_help_lists_every_config_key_with_type_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    mains = _mains()
    assert mains["encoder"](["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Train an LVFace encoder")
    assert "  --optim.lr  a number (default 0.001)" in out
    assert "  --loop.precision  one of 'fp32', 'bf16', 'fp16' (default \"fp32\")" in out
    assert "  --data.synthetic.num_pairs  an integer (default 600)" in out
    assert "  --lora  a mapping or null (default null)" in out
    assert mains["adapter"](["--config", "ignored.yaml", "-h"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Train the identity adapter")
    assert "  --stage2.optim.lr  a number (default 0.0002)" in out
    assert "  --stages  a list (default [1, 2])" in out


def test_accelerate_mixed_precision_sets_autocast_only_over_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert launcher_precision(LoopConfig()).precision == "fp32"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert launcher_precision(LoopConfig()).precision == "bf16"
    assert launcher_precision(LoopConfig(precision="fp16")).precision == "fp16"  # the config's choice wins
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert launcher_precision(LoopConfig()).precision == "fp32"


def test_one_process_without_launcher_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with process_group() as device:
        assert not dist.is_initialized()
        assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert setup_distributed() == device


def _launched_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    # What torchrun / accelerate launch put in each process's environment.
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    with process_group() as device:
        with process_group():  # nested (main() around train_*()): joins once, ends once
            total = torch.tensor([float(rank + 1)])
            dist.all_reduce(total)
            inner_world = dist.get_world_size()
        alive_after_inner = dist.is_initialized()
    gc.collect()
    result = {"device": str(device), "sum": total.item(), "world": inner_world, "alive_after_inner": alive_after_inner,
              "ended": not dist.is_initialized()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    sys.stdout.flush()
    os._exit(0)  # skip the slow interpreter teardown on a busy machine


@pytest.mark.multiproc
def test_torchrun_environment_starts_one_gloo_group_and_ends_it(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU (gloo) path")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_launched_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r == {"device": "cpu", "sum": 3.0, "world": 2, "alive_after_inner": True, "ended": True}
