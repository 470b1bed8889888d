"""Partial FC: one process equals full softmax; 2 gloo processes equal one process on the concatenated
batch (loss and every gradient); sampling keeps all positives; checkpoints move between world sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _losses_fixtures import direct_cross_entropy, run_workers

from lvface_mm.distributed import gather_rows, get_rank, get_world_size, shard_range, slice_rows
from lvface_mm.losses import ArcFaceMargin, CosFaceMargin, PartialFC, create_margin, init_centres

D, C, B = 16, 23, 6  # 23 classes: shards of 12 and 11 rows on 2 ranks, 8/8/7 on 3
MARGINS = {"cosface": {"margin": 0.4}, "arcface": {"margin": 0.5}}


def _global_batch(world: int, per_rank: int = B, num_classes: int = C, seed: int = 1234) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(per_rank * world, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, num_classes, (per_rank * world,), generator=gen)
    return x, y


# --- one process ---------------------------------------------------------------------------------


def test_shard_range_is_contiguous_and_balanced() -> None:
    for num, world in [(23, 2), (23, 3), (2, 3), (0, 4), (2_059_906, 64)]:
        ranges = [shard_range(num, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == num
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [e - s for s, e in ranges]
        assert sizes == [num // world + (1 if r < num % world else 0) for r in range(world)]
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\), got 2"):
        shard_range(10, 2, 2)


def test_uninitialised_helpers_are_one_process() -> None:
    assert (get_rank(), get_world_size()) == (0, 1)
    x = torch.arange(6.0).reshape(3, 2)
    torch.testing.assert_close(gather_rows(x, 3), x)
    assert slice_rows(x).data_ptr() == x.data_ptr()
    with pytest.raises(ValueError, match="owns rows \\[0, 4\\) of 4, i.e. 4 rows, but the local tensor has 3"):
        gather_rows(x, 4)


@pytest.mark.parametrize("kind", ["cosface", "arcface"])
def test_one_process_equals_full_softmax(kind: str) -> None:
    x, y = _global_batch(1, per_rank=12)
    head = PartialFC(D, C, create_margin(kind, scale=64.0, **MARGINS[kind])).double()
    mine = x.clone().requires_grad_()
    out = head(mine, y)
    out.loss.backward()
    ref_x = x.clone().requires_grad_()
    ref_w = init_centres(0, C, D).double().requires_grad_()
    ref = direct_cross_entropy(ref_x, ref_w, y, kind, **MARGINS[kind])
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(mine.grad, ref_x.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, ref_w.grad, rtol=1e-9, atol=1e-10)
    cos = F.normalize(x, dim=1) @ F.normalize(ref_w.detach(), dim=1).T
    torch.testing.assert_close(out.cos_target, cos[torch.arange(12), y])
    assert out.num_sampled == C and out.sampled_index is None and out.stage is None


def test_sampling_keeps_every_positive_and_fills_the_budget() -> None:
    head = PartialFC(D, 1000, CosFaceMargin(), sample_rate=0.1).double()
    x, y = _global_batch(1, per_rank=40, num_classes=1000)
    out = head(x, y)
    index = out.sampled_index
    assert out.num_sampled == 100 == index.numel() == index.unique().numel()
    assert torch.equal(index, index.sort().values)
    assert set(y.tolist()) <= set(index.tolist())
    # the loss is the full softmax restricted to the sampled columns
    cols = index.tolist()
    remap = torch.tensor([cols.index(c) for c in y.tolist()])
    ref = direct_cross_entropy(x, head.weight.detach()[index], remap, "cosface", margin=0.4)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-10)
    # more positives than the budget: positives only; rate 0 is positives only too
    for rate in (0.01, 0.0):
        small = PartialFC(D, 1000, CosFaceMargin(), sample_rate=rate)
        out = small(x.float(), y)
        assert out.sampled_index.tolist() == sorted(set(y.tolist()))


def test_dense_update_moves_unsampled_centres_sparse_update_does_not() -> None:
    x, y = _global_batch(1, per_rank=8, num_classes=200)
    x = x.float()
    for sparse in (False, True):
        torch.manual_seed(0)
        head = PartialFC(D, 200, CosFaceMargin(), sample_rate=0.1, sparse_update=sparse)
        opt = (torch.optim.SparseAdam if sparse else torch.optim.AdamW)(head.parameters(), lr=1e-2)
        before = head.weight.detach().clone()
        for _ in range(2):  # the second step has momentum from the first
            opt.zero_grad()
            out = head(x, y)
            out.loss.backward()
            assert head.weight.grad.is_sparse == sparse
            opt.step()
        unsampled = torch.ones(200, dtype=torch.bool)
        unsampled[out.sampled_index] = False
        unsampled[y] = False
        moved = (head.weight.detach() != before).any(dim=1)
        assert moved[out.sampled_index].all()
        if sparse:
            # rows sampled only in step 1 moved; rows never sampled are bit-identical
            assert moved.sum() < 200
            never = torch.ones(200, dtype=torch.bool)
            never[moved] = False
            assert never.sum() > 150 and torch.equal(head.weight.detach()[never], before[never])
        else:
            assert moved[unsampled].all()  # AdamW momentum and weight decay move every row


def test_dense_and_sparse_gradients_agree() -> None:
    x, y = _global_batch(1, per_rank=8, num_classes=200)
    grads = []
    for sparse in (False, True):
        torch.manual_seed(3)  # same sample
        head = PartialFC(D, 200, CosFaceMargin(), sample_rate=0.2, sparse_update=sparse).double()
        head(x, y).loss.backward()
        grads.append(head.weight.grad.to_dense())
    torch.testing.assert_close(grads[0], grads[1])


def test_init_does_not_depend_on_the_number_of_ranks() -> None:
    full = init_centres(0, 20_000, 8, seed=5)
    assert full.std().item() == pytest.approx(0.01, rel=0.02)
    for world in (2, 3, 7):
        parts = [init_centres(*shard_range(20_000, r, world), 8, seed=5) for r in range(world)]
        assert torch.equal(torch.cat(parts), full)
    assert not torch.equal(init_centres(0, 10, 8, seed=6), full[:10])


def test_full_state_dict_round_trip_and_errors() -> None:
    head = PartialFC(D, C, CosFaceMargin())
    state = head.full_state_dict()
    assert set(state) == {"weight"} and state["weight"].shape == (C, D)
    other = PartialFC(D, C, CosFaceMargin(), init_seed=9)
    other.load_full_state_dict(state)
    assert torch.equal(other.weight.detach(), head.weight.detach())
    with pytest.raises(ValueError, match=r"'weight' must have shape \(23, 16\).*got \(22, 16\)"):
        other.load_full_state_dict({"weight": torch.zeros(22, D)})
    with pytest.raises(ValueError, match=r"unexpected keys \['bank'\]"):
        other.load_full_state_dict({"weight": state["weight"], "bank": state["weight"]})
    other.load_full_state_dict({"weight": state["weight"], "bank": state["weight"]}, strict=False)


def test_bad_arguments_and_inputs_give_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"sample_rate must be in \[0, 1\].*got 1.5"):
        PartialFC(D, C, CosFaceMargin(), sample_rate=1.5)
    with pytest.raises(ValueError, match="margin must be a lvface_mm.losses Margin"):
        PartialFC(D, C, margin=torch.nn.Identity())
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        PartialFC(D, 0, CosFaceMargin())
    head = PartialFC(D, C, ArcFaceMargin())
    with pytest.raises(ValueError, match=r"embeddings must be \(B, 16\), got \(4, 8\)"):
        head(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 23\), got \[0, 23\]"):
        head(torch.randn(2, D), torch.tensor([0, 23]))
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        head(torch.randn(2, D), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels must be \(2,\) like the embeddings' batch, got \(3,\)"):
        head(torch.randn(2, D), torch.tensor([0, 1, 2]))


# --- two and three processes ------------------------------------------------------------------------


def _two_rank_worker(rank: int, world: int, ckpt: str) -> dict:
    out: dict = {}
    x, y = _global_batch(world)
    mine = slice(rank * B, (rank + 1) * B)
    for kind in MARGINS:
        for scaling in (False, True):
            head = PartialFC(D, C, create_margin(kind, **MARGINS[kind]), ddp_grad_scaling=scaling).double()
            xl = x[mine].clone().requires_grad_()
            res = head(xl, y[mine])
            res.loss.backward()
            out[(kind, scaling)] = {
                "loss": res.loss.detach(), "x_grad": xl.grad, "w_grad": head.weight.grad,
                "class_start": head.class_start, "cos_target": res.cos_target,
            }
    # sampling on 2 ranks: 400 classes, 200 per rank, budget 20 per rank
    torch.manual_seed(100 + rank)
    xs, ys = _global_batch(world, per_rank=8, num_classes=400, seed=7)
    head = PartialFC(D, 400, CosFaceMargin(), sample_rate=0.1, ddp_grad_scaling=False).double()
    xl = xs[rank * 8 : (rank + 1) * 8].clone().requires_grad_()
    res = head(xl, ys[rank * 8 : (rank + 1) * 8])
    res.loss.backward()
    out["sampled"] = {
        "loss": res.loss.detach(), "x_grad": xl.grad, "w_grad": head.weight.grad, "index": res.sampled_index,
        "class_start": head.class_start, "num_local": head.num_local, "num_sampled": res.num_sampled,
    }
    # unequal batches: every rank raises the same clear error instead of hanging
    try:
        head(xs[: 3 + rank], ys[: 3 + rank])
    except ValueError as err:
        out["unequal_batch_error"] = str(err)
    # a checkpoint after one AdamW step, saved by rank 0 from the gathered state
    head = PartialFC(D, C, CosFaceMargin())
    opt = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.1)
    head(x[mine].float(), y[mine]).loss.backward()
    opt.step()
    state = head.full_state_dict()
    state["exp_avg"] = gather_rows(opt.state[head.weight]["exp_avg"], C)
    if rank == 0:
        torch.save(state, ckpt)
    out["state"] = state
    return out


def _three_rank_worker(rank: int, world: int, ckpt: str) -> dict:
    state = torch.load(ckpt)
    head = PartialFC(D, C, CosFaceMargin())
    head.load_full_state_dict({"weight": state["weight"]})
    exp_avg = slice_rows(state["exp_avg"]).clone()
    x, y = _global_batch(world, per_rank=4)
    loss = head(x[rank * 4 : (rank + 1) * 4].float(), y[rank * 4 : (rank + 1) * 4]).loss.detach()
    # a rank that owns no rows still takes part in gather_rows
    tiny = gather_rows(torch.full((1 if rank < 2 else 0, 3), float(rank)), 2)
    return {
        "num_local": head.num_local, "weight": head.full_state_dict()["weight"], "exp_avg": gather_rows(exp_avg, C),
        "loss": loss, "tiny": tiny,
    }


@pytest.mark.multiproc
def test_partial_fc_across_processes(tmp_path) -> None:
    world = 2
    ckpt = str(tmp_path / "pfc.pt")
    results = run_workers(_two_rank_worker, world, tmp_path, ckpt)
    x, y = _global_batch(world)

    # r = 1: 2 ranks == full softmax in one process on the concatenated batch, loss and every gradient
    for kind in MARGINS:
        ref_x = x.clone().requires_grad_()
        ref_w = init_centres(0, C, D).double().requires_grad_()
        ref = direct_cross_entropy(ref_x, ref_w, y, kind, **MARGINS[kind])
        ref.backward()
        cos_target = (F.normalize(x, dim=1) @ F.normalize(ref_w.detach(), dim=1).T)[torch.arange(B * world), y]
        for scaling in (False, True):
            for rank, res in enumerate(results):
                got = res[(kind, scaling)]
                torch.testing.assert_close(got["loss"], ref.detach(), rtol=1e-12, atol=1e-10)
                torch.testing.assert_close(got["cos_target"], cos_target)
                factor = world if scaling else 1  # DDP averages backbone grads; scaling undoes it
                torch.testing.assert_close(got["x_grad"], factor * ref_x.grad[rank * B : (rank + 1) * B])
                start = got["class_start"]
                torch.testing.assert_close(got["w_grad"], ref_w.grad[start : start + got["w_grad"].shape[0]])
        assert [r[(kind, False)]["w_grad"].shape[0] for r in results] == [12, 11]

    # r = 0.1: every positive kept on its owner, budget filled, loss == softmax over the union of samples
    xs, ys = _global_batch(world, per_rank=8, num_classes=400, seed=7)
    sampled = []
    for res in results:
        got = res["sampled"]
        start, num_local = got["class_start"], got["num_local"]
        mine = {c - start for c in ys.tolist() if start <= c < start + num_local}
        assert mine <= set(got["index"].tolist())
        assert got["num_sampled"] == got["index"].numel() == max(int(0.1 * num_local), len(mine)) == 20
        sampled.append(got["index"] + start)
    cols = torch.cat(sampled)
    assert set(ys.tolist()) <= set(cols.tolist())
    ref_x = xs.clone().requires_grad_()
    ref_w = init_centres(0, 400, D).double().requires_grad_()
    remap = torch.tensor([cols.tolist().index(c) for c in ys.tolist()])
    ref = direct_cross_entropy(ref_x, ref_w[cols], remap, "cosface", margin=0.4)
    ref.backward()
    for rank, res in enumerate(results):
        got = res["sampled"]
        torch.testing.assert_close(got["loss"], ref.detach(), rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(got["x_grad"], ref_x.grad[rank * 8 : (rank + 1) * 8])
        start = got["class_start"]
        torch.testing.assert_close(got["w_grad"], ref_w.grad[start : start + got["num_local"]])

    for res in results:
        assert "every rank must pass the same batch size, got [3, 4]" in res["unequal_batch_error"]

    # the checkpoint is the same on both ranks; it loads into 1 and into 3 processes unchanged
    torch.testing.assert_close(results[0]["state"], results[1]["state"], rtol=0, atol=0)
    saved = torch.load(ckpt)
    assert saved["weight"].shape == (C, D) and not torch.equal(saved["weight"], init_centres(0, C, D))
    one = PartialFC(D, C, CosFaceMargin())
    one.load_full_state_dict({"weight": saved["weight"]})
    assert torch.equal(one.full_state_dict()["weight"], saved["weight"])
    x3, y3 = _global_batch(3, per_rank=4)
    one_loss = one(x3.float(), y3).loss.detach()

    three = run_workers(_three_rank_worker, 3, tmp_path, ckpt)
    assert [r["num_local"] for r in three] == [8, 8, 7]
    for res in three:
        assert torch.equal(res["weight"], saved["weight"])
        assert torch.equal(res["exp_avg"], saved["exp_avg"])
        torch.testing.assert_close(res["loss"], one_loss, rtol=1e-5, atol=1e-5)
        assert res["tiny"].tolist() == [[0.0] * 3, [1.0] * 3]


@pytest.mark.parametrize("head_type", ["partial_fc", "pco_stage2"])
def test_logits_stay_fp32_under_bf16_autocast(head_type: str) -> None:
    """The cosine matmul, margin and softmax run in fp32 even inside a bf16 autocast region."""
    from lvface_mm.losses import PCOHead

    torch.manual_seed(0)
    dim, classes, batch = 512, 1000, 64  # LVFace's embedding size: bf16 cos errors are ~1e-3 here

    def make() -> PartialFC:
        if head_type == "partial_fc":
            return PartialFC(dim, classes, CosFaceMargin(), sample_rate=1.0, init_seed=3)
        return PCOHead(dim, classes, sample_rate=1.0, stage=2, init_seed=3)

    x = torch.randn(batch, dim)
    y = torch.randint(0, classes, (batch,))
    ref_head, amp_head = make(), make()
    ref = ref_head(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = amp_head(x, y)
    assert amp.loss.dtype == torch.float32 and amp.cos_target.dtype == torch.float32
    assert (amp.cos_target - ref.cos_target).abs().max().item() < 1e-6
    assert abs(amp.loss.item() - ref.loss.item()) < 1e-5 * abs(ref.loss.item())
    # What the head avoids: the same cosine as a bf16 matmul is off by ~1e-3 (s = 64 makes that ~0.1 in logits).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_cos = F.linear(F.normalize(x, dim=1), F.normalize(ref_head.weight.detach(), dim=1))
    assert bf16_cos.dtype == torch.bfloat16
    assert (bf16_cos.float()[torch.arange(batch), y] - ref.cos_target).abs().max().item() > 1e-4
    # Gradients agree too; bf16 embeddings (a bf16 backbone's output) get a bf16 gradient back.
    xb = x.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        make()(xb, y).loss.backward()
    xf = x.to(torch.bfloat16).float().requires_grad_(True)
    make()(xf, y).loss.backward()
    assert xb.grad.dtype == torch.bfloat16
    # Equal up to the bf16 rounding of the returned gradient (2^-8 relative).
    torch.testing.assert_close(xb.grad.float(), xf.grad, rtol=1 / 128, atol=1e-2 * xf.grad.abs().max().item())
