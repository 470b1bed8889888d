"""PCO: the two-anchor loss against its formula (one process and 2 gloo processes), the feature
expectation bank's update rule, stage switching inside the head, and checkpoints with stage and bank."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _losses_fixtures import direct_cross_entropy, direct_two_anchor, run_workers

from lvface_mm.losses import CosineStageScheduler, FeatureExpectationBank, PCOHead, init_centres, two_anchor_loss

D, C, B = 16, 23, 6


def _batch(rows: int, num_classes: int = C, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, D, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, num_classes, (rows,), generator=gen)


def test_two_anchor_loss_is_the_paper_formula_on_logits() -> None:
    zw = torch.randn(10, 7, dtype=torch.float64, requires_grad=True)
    ze = torch.randn(10, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (10,))
    loss = two_anchor_loss(zw, ze, y)
    onehot = F.one_hot(y, 7).bool()
    tw, te = zw[onehot].unsqueeze(1), ze[onehot].unsqueeze(1)
    neg = lambda z, t: torch.where(onehot, torch.zeros_like(z), torch.exp(z - t)).sum(1)  # noqa: E731
    ref = torch.log(1 + neg(zw, tw) + neg(ze, te)).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    g1 = torch.autograd.grad(loss, (zw, ze))
    g2 = torch.autograd.grad(ref, (zw, ze))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_stage_three_matches_direct_formula_and_gradients() -> None:
    x, y = _batch(12)
    head = PCOHead(D, C, sample_rate=0.5, stage=3, ddp_grad_scaling=False).double()
    centres = init_centres(0, C, D).double()
    assert torch.allclose(head.bank.expectation, F.normalize(centres, dim=1))  # bank starts at the centres
    head.bank.expectation.add_(0.05 * torch.randn(C, D, dtype=torch.float64))  # make the two anchors differ
    bank = head.bank.expectation.clone()
    xs = x.clone().requires_grad_()
    out = head(xs, y)
    out.loss.backward()
    assert out.stage == 3 and out.sampled_index is None and out.num_sampled == C
    assert torch.equal(head.bank.expectation, bank)  # frozen in stage 3
    ref_x, ref_w = x.clone().requires_grad_(), centres.clone().requires_grad_()
    ref = direct_two_anchor(ref_x, ref_w, bank, y, 0.4, 0.4, 64.0)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(xs.grad, ref_x.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, ref_w.grad, rtol=1e-9, atol=1e-10)
    # the bank term makes the loss larger than CosFace alone (one more positive term inside the log)
    assert out.loss > direct_cross_entropy(x, centres, y, "cosface", margin=0.4)


def test_stage_two_is_subsampled_and_updates_the_bank() -> None:
    x, y = _batch(16, num_classes=200)
    head = PCOHead(D, 200, sample_rate=0.1, stage=2, margin=0.3, margin_bank=0.2, ddp_grad_scaling=False).double()
    bank = head.bank.expectation.clone()
    out = head(x, y)
    index = out.sampled_index
    assert out.stage == 2 and out.num_sampled == 20 and set(y.tolist()) <= set(index.tolist())
    remap = torch.tensor([index.tolist().index(c) for c in y.tolist()])
    ref = direct_two_anchor(x, head.weight.detach()[index], bank[index], remap, 0.3, 0.2, 64.0)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-10)
    changed = (head.bank.expectation != bank).any(dim=1)
    assert set(torch.nonzero(changed).squeeze(1).tolist()) == set(y.tolist())


def test_bank_update_rule() -> None:
    bank = FeatureExpectationBank(num_classes=4, feature_dim=3).double()
    with pytest.raises(RuntimeError, match="before initialize_from"):
        bank.update(torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1]))
    bank.initialize_from(torch.tensor([[2.0, 0, 0], [0, 3.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]], dtype=torch.float64))
    feats = torch.tensor([[0.0, 5.0, 0.0], [1.0, 1.0, 0.0], [3.0, 0.0, 4.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 2])
    bank.update(feats, labels)
    # class 0: mean of the normalised features (0,1,0) and (1,1,0)/sqrt2
    mean0 = (torch.tensor([0.0, 1.0, 0.0]) + torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2)).double() / 2
    a0 = 1 / (1 + math.exp(-F.cosine_similarity(mean0, torch.tensor([1.0, 0, 0]).double(), dim=0).item()))
    torch.testing.assert_close(bank.expectation[0], a0 * torch.tensor([1.0, 0, 0]).double() + (1 - a0) * mean0)
    a2 = 1 / (1 + math.exp(-0.8))  # cos((0.6, 0, 0.8), (0, 0, 1)) = 0.8
    torch.testing.assert_close(
        bank.expectation[2], a2 * torch.tensor([0, 0, 1.0]).double() + (1 - a2) * torch.tensor([0.6, 0, 0.8]).double()
    )
    torch.testing.assert_close(bank.expectation[1], torch.tensor([0, 1.0, 0]).double())  # untouched
    frozen = bank.expectation.clone()
    bank.frozen = True
    bank.update(feats, labels)
    assert torch.equal(bank.expectation, frozen)


def test_stage_one_is_partial_fc_cosface_and_stage_setter() -> None:
    x, y = _batch(8)
    head = PCOHead(D, C, sample_rate=1.0).double()
    out = head(x, y)
    ref = direct_cross_entropy(x, init_centres(0, C, D).double(), y, "cosface", margin=0.4)
    torch.testing.assert_close(out.loss, ref)
    assert out.stage == 1 and not bool(head.bank.initialized)
    head.stage = 2
    assert bool(head.bank.initialized) and not head.bank.frozen
    torch.testing.assert_close(head.bank.expectation, F.normalize(head.weight.detach(), dim=1))
    head.stage = 3
    assert head.bank.frozen and head.state_dict()["stage_buffer"].item() == 3
    for bad in (0, 4, "2", True):
        with pytest.raises(ValueError, match="PCOHead.stage must be one of"):
            head.stage = bad
    with pytest.raises(ValueError, match="margin_type must be 'cosface' or 'arcface'"):
        PCOHead(D, C, margin_type="combined")


def test_full_state_dict_round_trip() -> None:
    head = PCOHead(D, C, stage=2)
    head.bank.expectation.mul_(0.5)
    state = head.full_state_dict()
    assert set(state) == {"weight", "bank", "bank_initialized", "stage"} and int(state["stage"]) == 2
    other = PCOHead(D, C, init_seed=1)
    other.load_full_state_dict(state)
    assert other.stage == 2 and bool(other.bank.initialized)
    assert torch.equal(other.bank.expectation, head.bank.expectation)
    assert torch.equal(other.weight, head.weight)
    with pytest.raises(ValueError, match=r"missing keys \['bank', 'bank_initialized', 'stage'\]"):
        other.load_full_state_dict({"weight": state["weight"]})
    # the plain (same world size) state_dict carries the stage too; the bank follows it on the next step
    head.stage = 3
    plain = PCOHead(D, C)
    plain.load_state_dict(head.state_dict())
    bank = plain.bank.expectation.clone()
    x, y = _batch(4)
    assert plain(x.float(), y).stage == 3 and plain.bank.frozen
    assert torch.equal(plain.bank.expectation, bank)


# --- two processes ------------------------------------------------------------------------------


def _pco_worker(rank: int, world: int) -> dict:
    out: dict = {}
    head = PCOHead(D, C, sample_rate=0.5, ddp_grad_scaling=False).double()
    head.stage = 2
    for step, seed in ((2, 1), (3, 2)):
        x, y = _batch(B * world, seed=seed)
        head.stage = step
        head.weight.grad = None
        xl = x[rank * B : (rank + 1) * B].clone().requires_grad_()
        res = head(xl, y[rank * B : (rank + 1) * B])
        res.loss.backward()
        out[step] = {
            "loss": res.loss.detach(), "x_grad": xl.grad, "w_grad": head.weight.grad.clone(),
            "index": res.sampled_index, "cos_target": res.cos_target,
            "bank": head.full_state_dict()["bank"],
        }
    out["class_start"] = head.class_start
    out["state"] = head.full_state_dict()
    # stage scheduler: ranks see different values, agree on their mean and switch together
    sched = CosineStageScheduler(0.2, 0.35)
    own = [0.05, 0.15, 0.25, 0.5, 0.6] if rank == 0 else [0.05, 0.3, 0.15, 0.2, 0.1]
    out["stages"] = [sched.update(v, step) for step, v in enumerate(own)]
    out["smoothed"] = sched.smoothed
    return out


@pytest.mark.multiproc
def test_pco_and_stage_scheduler_across_processes(tmp_path) -> None:
    world = 2
    results = run_workers(_pco_worker, world, tmp_path)
    centres = init_centres(0, C, D).double()
    single = PCOHead(D, C, sample_rate=1.0).double()  # the same bank updates in one process
    single.stage = 2
    for stage, seed in ((2, 1), (3, 2)):
        x, y = _batch(B * world, seed=seed)
        bank = single.bank.expectation.clone()
        single.stage = stage
        single(x, y)
        if stage == 2:  # sampled: the union of both ranks' sampled classes, every positive included
            cols = torch.cat([r[stage]["index"] + r["class_start"] for r in results])
            assert set(y.tolist()) <= set(cols.tolist())
            shards = ((0, 12), (12, 23))
            budgets = [max(int(0.5 * (hi - lo)), len({c for c in y.tolist() if lo <= c < hi})) for lo, hi in shards]
            assert [r[stage]["index"].numel() for r in results] == budgets
        else:
            assert all(r[stage]["index"] is None for r in results)
            cols = torch.arange(C)
        remap = torch.tensor([cols.tolist().index(c) for c in y.tolist()])
        ref_x, ref_w = x.clone().requires_grad_(), centres.clone().requires_grad_()
        ref = direct_two_anchor(ref_x, ref_w[cols], bank[cols], remap, 0.4, 0.4, 64.0)
        ref.backward()
        for rank, res in enumerate(results):
            got = res[stage]
            torch.testing.assert_close(got["loss"], ref.detach(), rtol=1e-12, atol=1e-10)
            torch.testing.assert_close(got["x_grad"], ref_x.grad[rank * B : (rank + 1) * B], rtol=1e-9, atol=1e-12)
            start = res["class_start"]
            torch.testing.assert_close(got["w_grad"], ref_w.grad[start : start + got["w_grad"].shape[0]])
            torch.testing.assert_close(got["bank"], single.bank.expectation, rtol=1e-12, atol=1e-12)
    # checkpoint from 2 ranks == the one-process head's state; loads into one process
    for res in results:
        state = res["state"]
        assert int(state["stage"]) == 3 and bool(state["bank_initialized"])
        torch.testing.assert_close(state["bank"], single.bank.expectation, rtol=1e-12, atol=1e-12)
    one = PCOHead(D, C).double()
    one.load_full_state_dict(results[0]["state"])
    assert one.stage == 3 and one.bank.frozen
    # scheduler: means 0.05, 0.225 (-> 2), 0.2, 0.35 (-> 3), 0.35: identical decisions on both ranks
    assert results[0]["stages"] == results[1]["stages"] == [1, 2, 2, 3, 3]
    assert results[0]["smoothed"] == pytest.approx(0.35)


def test_deferred_bank_update_equals_one_update_on_the_whole_step() -> None:
    """Two micro-batches with `defer_bank_update` + commit = one forward on the concatenated batch."""
    torch.manual_seed(5)
    x = torch.randn(12, D, dtype=torch.float64)
    y = torch.randint(0, C, (12,))
    y[7] = y[1]  # a class in both micro-batches: its update uses the mean over both
    whole = PCOHead(D, C, sample_rate=1.0, stage=2, ddp_grad_scaling=False).double()
    split = PCOHead(D, C, sample_rate=1.0, stage=2, ddp_grad_scaling=False, defer_bank_update=True).double()
    start = split.bank.expectation.clone()
    whole(x, y)
    split(x[:6], y[:6])
    assert torch.equal(split.bank.expectation, start) and split.bank.has_pending  # nothing applied yet
    split(x[6:], y[6:])  # the second micro-batch still trains against the step's starting bank
    split.commit_bank_update()
    assert not split.bank.has_pending
    torch.testing.assert_close(split.bank.expectation, whole.bank.expectation, rtol=0, atol=1e-12)
    # Per micro-batch updates (two steps' worth) would have moved the shared class differently.
    eager = PCOHead(D, C, sample_rate=1.0, stage=2, ddp_grad_scaling=False).double()
    eager(x[:6], y[:6])
    eager(x[6:], y[6:])
    assert (eager.bank.expectation[y[1]] - whole.bank.expectation[y[1]]).abs().max() > 1e-3
