"""The generic loop: schedule, data order, gradient accumulation, NaN stop, refusing to overwrite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from lvface_mm.data import IRHeader, RecordWriter, pack, write_verification_bin
from lvface_mm.data.synthetic import SyntheticFaces, SyntheticFacesConfig, heldout_pairs
from tests._training_fixtures import Points, Regression
from training.checkpoint import CheckpointManager, read_checkpoint
from training.config import CheckpointConfig, ConfigError, LoopConfig, OptimConfig
from training.data import GlobalBatchSampler
from training.encoder import main as encoder_main
from training.loop import NonFiniteLossError, Trainer, WarmupPolyDecay, adamw_param_groups, build_adamw

TINY = str(Path(__file__).resolve().parents[1] / "training" / "configs" / "encoder" / "tiny_synthetic.yaml")


def make_trainer(tmp: Path, batch_size: int, accum: int, data: Dataset | None = None, **ckpt: object) -> Trainer:
    task = Regression()
    optim = OptimConfig(lr=0.3, weight_decay=0.01, warmup_steps=2, clip_grad_norm=None)
    loop = LoopConfig(epochs=3, grad_accum_steps=accum, log_every=1, tensorboard=False, progress_bar=False)
    return Trainer(task, build_adamw(task, optim), data or Points(), batch_size, optim=optim, loop=loop,
                   checkpoint=CheckpointConfig(**{"every_steps": 0, **ckpt}), run_dir=tmp, device=torch.device("cpu"))


def test_warmup_then_polynomial_decay_per_optimizer_step() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupPolyDecay(opt, total_steps=10, warmup_steps=4, power=2.0, min_lr_ratio=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # after warm-up: 0.1 + 0.9 * (1 - (s - 4) / 6) ** 2
    assert lrs[4:] == pytest.approx([0.1 + 0.9 * (1 - k / 6) ** 2 for k in range(6)])
    sched.set_step(10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_global_batches_do_not_depend_on_ranks_or_accumulation() -> None:
    def steps(sampler: GlobalBatchSampler, per_step: int) -> list[list[int]]:
        flat = [i for i, _ in sampler]
        return [flat[k : k + per_step] for k in range(0, len(flat), per_step)]

    two_ranks = [GlobalBatchSampler(50, 4, rank=r, world_size=2, seed=3, with_seeds=True) for r in range(2)]
    one_rank = GlobalBatchSampler(50, 4, grad_accum_steps=2, seed=3, with_seeds=True)
    assert one_rank.steps_per_epoch == two_ranks[0].steps_per_epoch == 6  # 50 // 8, last partial batch dropped
    r0, r1, single = steps(two_ranks[0], 4), steps(two_ranks[1], 4), steps(one_rank, 8)
    assert [a + b for a, b in zip(r0, r1)] == single  # micro-batch m of the single rank = rank m's batch
    assert len({i for s in single for i in s}) == 48  # no sample twice in an epoch
    # The augmentation seed travels with the sample position, not with the rank.
    assert dict(iter(one_rank))[single[0][0]] == dict(iter(two_ranks[0]))[single[0][0]]
    # Resuming two global batches into the epoch yields exactly the rest.
    one_rank.set_position(0, samples_consumed=16)
    assert steps(one_rank, 8) == single[2:]
    one_rank.set_position(1)
    assert steps(one_rank, 8) != single  # every epoch has its own permutation
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(7, 4, world_size=2)


def test_gradient_accumulation_equals_the_large_batch(tmp_path: Path) -> None:
    big = make_trainer(tmp_path / "big", batch_size=8, accum=1)
    small = make_trainer(tmp_path / "small", batch_size=4, accum=2)
    assert big.total_steps == small.total_steps == 24  # 3 epochs x 8 optimizer steps: the schedule counts steps
    big.fit()
    small.fit()
    for a, b in zip(big.task.parameters(), small.task.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert big.scheduler.step_count == small.scheduler.step_count == 24
    # It learned something: the loss of the final parameters is far below the initial one.
    with torch.no_grad():
        final = float(big.task(Points()[:])["loss"])
        initial = float(Regression()(Points()[:])["loss"])
    assert final < 0.05 * initial


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    data = Points(poison=5)
    sampler = GlobalBatchSampler(len(data), 8)
    bad_step = next(s for s in range(sampler.steps_per_epoch)
                    if 5 in sampler.order(0)[0][s * 8 : (s + 1) * 8].tolist()) + 1
    trainer = make_trainer(tmp_path, batch_size=8, accum=1, data=data, every_steps=1)
    with pytest.raises(NonFiniteLossError, match=rf"loss is nan at step {bad_step} .*Last good checkpoint"):
        trainer.fit()
    manager = CheckpointManager(tmp_path / "checkpoints")
    if bad_step > 1:
        good = read_checkpoint(manager.latest())
        assert good["progress"]["step"] == bad_step - 1
        assert all(torch.isfinite(t).all() for t in good["model"]["replicated"].values())
        # The NaN step was never applied: the live parameters equal the last checkpoint's.
        for name, param in trainer.task.named_parameters():
            assert torch.equal(param.detach(), good["model"]["replicated"][name])
    else:
        assert manager.latest() is None
    assert all(step < bad_step for step in manager.steps())


def test_resume_never_refuses_a_directory_with_checkpoints(tmp_path: Path) -> None:
    make_trainer(tmp_path, batch_size=8, accum=1).fit()
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    trainer = make_trainer(tmp_path, batch_size=8, accum=1, resume="never")
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        trainer.fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_finished_run_resumes_without_training(tmp_path: Path) -> None:
    first = make_trainer(tmp_path, batch_size=8, accum=1)
    first.fit()
    again = make_trainer(tmp_path, batch_size=8, accum=1)
    assert again.fit().step == 24
    for a, b in zip(first.task.parameters(), again.task.parameters()):
        assert torch.equal(a, b)


def test_param_groups_exempt_norms_biases_and_named_parameters() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    model.register_parameter("pos_embed", nn.Parameter(torch.zeros(1, 2, 3)))
    groups = adamw_param_groups(model, 0.1, exclude_norm_bias=True, no_decay_names={"pos_embed"})
    assert [len(g["params"]) for g in groups] == [1, 4] and groups[1]["weight_decay"] == 0.0
    assert len(adamw_param_groups(model, 0.1, exclude_norm_bias=False)[0]["params"]) == 5


def _png(image_chw: torch.Tensor) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", np.ascontiguousarray(image_chw.permute(1, 2, 0).numpy()[:, :, ::-1]))
    assert ok
    return data.tobytes()


def test_recordio_and_image_folder_sources_with_bin_verification(tmp_path: Path) -> None:
    """Both on-disk sources feed the encoder program (bf16 autocast), and `.bin` sets are verified."""
    synthetic = SyntheticFacesConfig(num_identities=8, images_per_identity=4, heldout_identities=4, num_pairs=20)
    faces = SyntheticFaces(synthetic)
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:  # im2rec layout, scalar labels
        for i in range(len(faces)):
            image, label = faces[i]
            writer.write(pack(IRHeader(label=float(label), id=i), _png(image)), key=i)
            (tmp_path / "folder" / f"id{label:02d}").mkdir(parents=True, exist_ok=True)
            (tmp_path / "folder" / f"id{label:02d}" / f"{i}.png").write_bytes(_png(image))
    pairs = heldout_pairs(synthetic)
    write_verification_bin(tmp_path / "val.bin", [(_png(a), _png(b), bool(same)) for a, b, same in
                                                  zip(pairs.images_a, pairs.images_b, pairs.issame)])
    common = ["--config", TINY, "--loop.progress_bar=false", "--loop.tensorboard=false", "--data.num_workers=0",
              "--data.batch_size=8", "--loop.max_steps=3", "--loop.precision=bf16", "--eval.every_steps=0",
              f"--eval.bin_files=[{tmp_path / 'val.bin'}]", "--data.num_classes=8"]
    for source, path in (("recordio", tmp_path), ("image_folder", tmp_path / "folder")):
        out = tmp_path / source
        encoder_main(common + [f"--data.source={source}", f"--data.path={path}", f"--output_dir={out}"])
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        (evaluation,) = [r for r in records if r["kind"] == "eval"]
        assert 0.0 <= evaluation["val/acc"] <= 1.0 and "synthetic_heldout/acc" not in evaluation
        final = read_checkpoint(out / "checkpoints" / "step_00000003")
        assert final["model"]["sharded"]["head"]["weight"].shape == (8, 512)
        assert math.isfinite(records[-2]["loss"])
    with pytest.raises(ConfigError, match="data.num_classes is 9 but recordio data .* has 8 identities"):
        encoder_main(common + ["--data.source=recordio", f"--data.path={tmp_path}", "--data.num_classes=9",
                               f"--output_dir={tmp_path / 'bad'}"])
