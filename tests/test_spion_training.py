"""SPION training: dense warm-up, the switch at the criterion, sparse training continues and learns."""

import warnings

import pytest
import torch
from torch import nn

import sparsecc
from sparsecc import testing as T
from sparsecc.train.spion import SpionSchedule, fit

warnings.filterwarnings("ignore")


Classifier = T.CountingClassifier
_batches = T.counting_batches


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_fit_switches_at_the_criterion_and_keeps_learning():
    torch.manual_seed(0)
    model = Classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = _batches(40)
    schedule = SpionSchedule(sparsecc.Spion(method="spion_cf", block=8, quantile=0.5, kernel_size=3),
                             check_every=5, threshold_pct=1e9, calibration_batches=2)
    result = fit(model, train, _loss, steps=60, lr=3e-3, schedule=schedule, progress=False)
    # maps at steps 5, 10, 15: the third check is the first with a delta, and 1e9 % always passes
    assert result.switched_at == 15
    assert result.switch_reason.startswith("step 15: every layer's attention-map delta below 1e+09 % (released rule")
    assert len(result.deltas) == 3 and set(result.deltas[-1]) == {"encoder.layers.0.self_attn", "encoder.layers.1.self_attn"}
    assert isinstance(result.model, sparsecc.SparseModel)
    ops = [n.target for n in result.model.graph_module.graph.nodes]
    assert ops.count(torch.ops.sparsecc.block_sparse_attention.default) == 2
    assert all(0 < l.density < 1 for l in result.model.layouts.values())
    losses = torch.tensor(result.losses)
    assert torch.isfinite(losses).all()
    assert losses[-10:].mean() < losses[:10].mean()  # it learned, across the switch
    # the sparse model predicts held-out data better than chance
    test = _batches(4, seed=1)
    with torch.no_grad():
        acc = torch.cat([(result.model(x).argmax(-1) == y) for x, y in test]).float().mean()
    assert acc > 0.6
    for k, v in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k])


def test_no_switch_when_maps_keep_moving():
    torch.manual_seed(0)
    schedule = SpionSchedule(sparsecc.Spion(block=8), check_every=5, threshold_pct=1e-9)
    with pytest.warns(UserWarning, match="SPION: the model stayed dense; switch never: the released rule did not "
                                         r"hold in 4 checks of 20 steps .* set SpionSchedule\(max_dense_steps=...\)"):
        result = fit(Classifier(), _batches(10), _loss, steps=20, lr=3e-3, schedule=schedule, progress=False)
    assert result.switched_at is None and not isinstance(result.model, sparsecc.SparseModel)
    assert len(result.deltas) == 4 and result.switch_reason.startswith("never:")


def test_max_dense_steps_forces_the_switch():
    torch.manual_seed(0)
    schedule = SpionSchedule(sparsecc.Fixed(pattern="bigbird", block=8, density=0.5), check_every=100,
                             max_dense_steps=7)
    with pytest.warns(UserWarning, match="switching to sparse attention because step 7: max_dense_steps=7 reached "
                                         "before the released rule held .*none yet: a delta needs three checks"):
        result = fit(Classifier(), _batches(10), _loss, steps=10, schedule=schedule, progress=False)
    assert result.switched_at == 7 and isinstance(result.model, sparsecc.SparseModel)


def test_the_switch_keeps_adamw_moments_and_restarts_the_schedule(monkeypatch):
    """As released: the optimizer state survives the recompile (moments carried by parameter name) and the
    learning-rate schedule starts again at the switch over the steps left."""
    import sparsecc.train.spion as spion
    seen = {}
    real = spion.move_optimizer_state

    def recording(opt, old, new):
        seen["before"] = {n: opt.state[p]["exp_avg"].clone() for n, p in old.items() if p in opt.state}
        carried, fresh = real(opt, old, new)
        seen["after"] = {n: opt.state[p]["exp_avg"].clone() for n, p in new.items() if p in opt.state}
        seen["lr"], seen["carried"], seen["fresh"] = opt, carried, fresh
        return carried, fresh
    monkeypatch.setattr(spion, "move_optimizer_state", recording)
    torch.manual_seed(0)
    schedule = SpionSchedule(sparsecc.Fixed(pattern="local", block=8, density=0.5), check_every=100,
                             max_dense_steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit(Classifier(), _batches(10), _loss, steps=12, lr=1e-2, schedule=schedule, progress=False,
                     lr_schedule="linear")
    assert result.switched_at == 5 and not seen["fresh"]
    names = dict(Classifier().named_parameters())
    assert len(seen["carried"]) == len(names)  # every parameter found again in the compiled model
    matched = sum(torch.equal(seen["before"][n], seen["after"][m]) for n, m in zip(sorted(seen["before"]),
                                                                                   sorted(seen["after"])))
    assert matched == len(seen["before"]) == len(names)
    # linear schedule restarted over the 7 steps left: after the 7th step its factor is 0
    assert seen["lr"].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
