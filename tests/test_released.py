"""Behaving as the authors' released code does (issue 20), each against values computed by hand here:
the SparseFlow penalty and balance terms, the optimiser's learning rates per group over the schedule,
the SPION switch rule, the sparse FFN controller's straight-through gradient, and the released
softmax that counts pruned keys as logit 0."""

from __future__ import annotations

import math

import pytest
import torch

import sparsecc
from sparsecc import testing as T
from sparsecc.layouts import block_mask_to_ell
from sparsecc.methods.spion.layouts import SwitchCriterion
from sparsecc.methods.token_flow.fit import balance_loss, sparsity_penalty
from sparsecc.nn.sparse_ffn import SparseFFN, SparseFFNController
from sparsecc.ops.block_sparse_attention.pruned import pruned_as_logit_zero, pruned_count
from sparsecc.train.optim import Schedule, lr_factor, make_optimizer, move_optimizer_state, param_groups


# ------------------------------------------------------------------ SparseFlow: penalty and balance
@pytest.fixture(scope="module")
def flow_gates():
    model, inputs = T.bert()  # two layers: two flowed segments, layer weights 1 and 2
    sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(keep=0.5)), progress=False)
    return sm.flow_gates


def test_penalty_is_per_example_over_its_tokens_and_a_weighted_mean(flow_gates):
    g = flow_gates
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)  # the second example has 2 tokens
    g.last_gates = {
        0: (torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]]), valid),  # kept 3/4 and 1/2
        1: (torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0]]), valid),  # kept 1/4 and 2/2
    }
    # layer 0: ((0.75-0.5)^2 + 0)/2 = 0.03125; layer 1: ((0.25-0.5)^2 + (1-0.5)^2)/2 = 0.15625, weight 2
    want = (1 * 0.03125 + 2 * 0.15625) / (1 + 2)
    assert float(sparsity_penalty(g)) == pytest.approx(want)
    # pooled over the batch, not normalised (sparsecc 0.1): (4/6 - 0.5)^2 + 2 * (3/6 - 0.5)^2
    assert float(sparsity_penalty(g, form="pooled")) == pytest.approx((4 / 6 - 0.5) ** 2)
    assert float(sparsity_penalty(g, target=0.75)) == pytest.approx(
        (1 * (0 + 0.0625) / 2 + 2 * (0.25 + 0.0625) / 2) / 3)
    with pytest.raises(ValueError, match="penalty form 'sum' is not known"):
        sparsity_penalty(g, form="sum")
    g.last_gates = {}


def test_balance_is_the_chosen_share_times_the_mean_probability(flow_gates):
    g = flow_gates
    mix = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    g.last_mix = {0: mix}
    # arg-max choices 0, 0, 1, 2 -> shares (0.5, 0.25, 0.25); mean probabilities (0.4, 0.375, 0.225)
    assert float(balance_loss(g)) == pytest.approx(0.5 * 0.4 + 0.25 * 0.375 + 0.25 * 0.225)
    assert float(balance_loss(g, form="squares")) == pytest.approx(3 * (0.4**2 + 0.375**2 + 0.225**2) - 1)
    g.last_mix = {}


# ------------------------------------------------------------------ one optimiser, one schedule
def test_cosine_schedule_with_warmup_factors():
    steps, warmup = 110, 10
    assert lr_factor(0, steps, warmup) == 0.0
    assert lr_factor(5, steps, warmup) == pytest.approx(0.5)
    assert lr_factor(10, steps, warmup) == pytest.approx(1.0)
    assert lr_factor(60, steps, warmup) == pytest.approx(0.5)  # half-way through the decay
    assert lr_factor(35, steps, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_factor(110, steps, warmup) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(60, steps, warmup, "linear") == pytest.approx(0.5)
    assert lr_factor(60, steps, warmup, "constant") == 1.0


def test_fit_flow_trains_gates_router_and_model_at_their_rates_under_one_schedule(monkeypatch):
    import sparsecc.train.flow as flow
    model, inputs = T.bert()
    sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(keep=0.5)), progress=False)
    seen, made = [], []

    def recording(groups):
        opt = make_optimizer(groups)
        made.append(opt)
        opt.register_step_pre_hook(lambda o, a, k: seen.append({g["role"]: g["lr"] for g in o.param_groups}))
        return opt
    monkeypatch.setattr(flow, "make_optimizer", recording)
    steps, warmup = 9, 1
    flow.fit_flow(sm, [inputs], teacher=model, steps=steps, warmup=warmup, lr=2e-5, progress=False, calibrate=False)
    assert sorted(seen[0]) == ["gates", "model", "routers"]
    for step in (0, warmup, 5, steps - 1):
        f = lr_factor(step, steps, warmup)
        assert seen[step]["gates"] == pytest.approx(0.1 * f) and seen[step]["routers"] == pytest.approx(2e-5 * f)
        assert seen[step]["model"] == pytest.approx(2e-5 * f)
    assert seen[5]["gates"] == pytest.approx(0.1 * 0.5)  # the middle of the cosine
    groups = {g["role"]: {id(p) for p in g["params"]} for g in made[0].param_groups}
    assert groups["gates"] == {id(sm.flow_gates.table)}
    assert groups["routers"] == {id(p) for p in sm.flow_gates.routers.parameters()}
    assert not groups["model"] & (groups["gates"] | groups["routers"]) and len(groups["model"]) > 10


def test_phase_change_keeps_the_optimizer_state_and_restarts_the_schedule():
    a = torch.nn.Linear(3, 2)
    opt = make_optimizer(param_groups(a, {}, model_lr=0.1))
    sched = Schedule(steps=10, warmup=0, kind="linear").attach(opt)
    a(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.09)
    moments = opt.state[a.weight]["exp_avg"].clone()
    b = torch.nn.Linear(3, 2)
    carried, fresh = move_optimizer_state(opt, dict(a.named_parameters()), {"model.weight": b.weight,
                                                                           "model.bias": b.bias})
    assert carried == ["model.weight", "model.bias"] and fresh == []
    assert torch.equal(opt.state[b.weight]["exp_avg"], moments) and a.weight not in opt.state
    sched.restart(5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1) and opt.param_groups[0]["params"] == [b.weight, b.bias]


# ------------------------------------------------------------------ SPION switch rule
def _feed(rule: str, threshold: float, values: list[float]) -> tuple[list[bool], list[dict]]:
    E = torch.full((2, 2), 0.5, dtype=torch.float64)  # ||E||_F = 1, so ||a E - b E|| = |a - b|
    sc = SwitchCriterion(threshold, rule=rule)
    out, deltas = [], []
    for v in values:
        out.append(sc.update({"l0": v * E, "l1": v * E}))
        deltas.append(dict(sc.deltas))
    return out, deltas


def test_released_switch_compares_the_third_map_with_the_first_then_consecutive_ones():
    a = [0.0, 1.0, 2.1, 2.1 + 2.1 * 1.157]
    # released: d2 = |A2 - A1| = 1; d3 = |A3 - A1| = 2.1 -> 110 %; d4 = |A4 - A3| = 2.4297 -> 15.7 %, int 15 < 15.5
    switched, deltas = _feed("released", 15.5, a)
    assert switched == [False, False, False, True]
    assert deltas[2]["l0"] == pytest.approx(110.0) and deltas[3]["l0"] == pytest.approx(15.7)
    # consecutive: d3 = |A3 - A2| = 1.1 -> 10 % < 15.5 at the third check already
    switched, deltas = _feed("consecutive", 15.5, a)
    assert switched == [False, False, True, True] and deltas[2]["l0"] == pytest.approx(10.0)
    # int truncation: 15.7 % passes 15.5 only as released; 15.2 % does not pass 15
    assert _feed("consecutive", 15.5, a[:2] + [1.0 + 1.157])[0] == [False, False, False]
    assert _feed("released", 15.0, [0.0, 1.0, 2.152])[0] == [False, False, False]  # |2.152 - 0| vs 1: 115 %
    assert _feed("released", 15.0, [0.0, 1.0, 1.1499])[0] == [False, False, True]  # 14.99 %
    with pytest.raises(Exception, match="switch rule 'paper' is not known"):
        SwitchCriterion(15, rule="paper")


# ------------------------------------------------------------------ sparse FFN: the straight-through gradient
@pytest.mark.parametrize("mask_at", ["pre_activation", "post_activation"])
def test_controller_gradient_of_two_blocks_against_the_hand_derivation(mask_at):
    torch.manual_seed(0)
    d_model, d_ff, n = 3, 4, 2
    w_in = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    w_out = torch.randn(d_model, d_ff)
    ctrl = SparseFFNController(d_model, d_ff, n, d_lowrank=2, temperature=0.0, st_prob=1.0)
    with torch.no_grad():  # logits = bias: block 0 picks unit 0, block 1 unit 3 (global)
        ctrl.c1.zero_()
        ctrl.c2.zero_()
        ctrl.bias.copy_(torch.tensor([0.3, -0.2, -0.5, 0.4]))
    ffn = SparseFFN(w_in, None, w_out, None, n=n, d_lowrank=2, activation="relu", controller=ctrl,
                    mask_at=mask_at).train()
    x = torch.tensor([[0.5, 2.0, -1.0]])
    ffn(x).sum().backward()
    assert ctrl.last_mode == "straight_through"
    a = x @ w_in.T  # pre-activations [0.5, 2.0, -1.0, 2.5]
    g = w_out.sum(0)  # d(sum of outputs) / dh_j
    logits = (x @ ctrl.c1 @ ctrl.c2 + ctrl.bias).detach().view(2, n)
    p = logits.softmax(-1)
    chosen = logits.argmax(-1)
    want = []
    for blk in range(2):
        units = torch.arange(blk * n, blk * n + n)
        if mask_at == "pre_activation":  # d/dm_j relu(a_j m_j) = a_j [a_j m_j > 0]: only the chosen unit
            dm = torch.zeros(n)
            j = units[chosen[blk]]
            dm[chosen[blk]] = g[j] * a[0, j] * float(a[0, j] > 0)
        else:  # d/dm_j relu(a_j) m_j = relu(a_j): every unit
            dm = g[units] * a[0, units].clamp_min(0)
        pb = p[blk]
        want.append((torch.diag(pb) - pb[:, None] * pb[None, :]) @ dm)  # the softmax Jacobian
    want = torch.cat(want)
    assert torch.allclose(ctrl.bias.grad, want, atol=1e-6), (ctrl.bias.grad, want)
    if mask_at == "pre_activation":  # an unchosen unit with a positive pre-activation passes nothing
        assert chosen.tolist() == [0, 1] and a[0, 1] > 0


# ------------------------------------------------------------------ released SPION softmax
def _dense_released(q, k, v, mask_tiles, block, scale, causal, kpm):
    """Attention whose scores outside the layout are 0 in the denominator only (the released CSR softmax)."""
    B, H, L, D = q.shape
    S = k.shape[2]
    kept = mask_tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)[:L, :S]
    allowed = torch.ones(L, S, dtype=torch.bool)
    if causal:
        allowed = torch.ones(L, S, dtype=torch.bool).tril(S - L)
    valid = allowed[None] & (torch.ones(B, S, dtype=torch.bool) if kpm is None else kpm)[:, None, :]  # [B, L, S]
    s = (q @ k.transpose(-1, -2)) * scale
    stored = (kept[None] & valid)[:, None]  # [B, 1, L, S]
    e = torch.where(stored, s.exp(), torch.zeros(()))
    pruned = (valid & ~kept[None]).sum(-1)[:, None, :, None].to(s.dtype)
    return (e @ v) / (e.sum(-1, keepdim=True) + pruned)


@pytest.mark.parametrize("causal", [False, True])
def test_pruned_keys_as_logit_zero_against_the_dense_formula(causal):
    torch.manual_seed(1)
    B, H, L, D, block = 2, 2, 12, 4, 4
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(3))
    tiles = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    if not causal:
        tiles[0, 2] = True
    idx, cnt = block_mask_to_ell(tiles)
    kpm = torch.ones(B, L, dtype=torch.bool)
    kpm[1, 9:] = False  # the second example has 9 keys
    scale = D ** -0.5
    out, lse = torch.ops.sparsecc.block_sparse_attention(q, k, v, idx, cnt, block, scale, causal, kpm)
    got = pruned_as_logit_zero(out, lse, q, k, idx, cnt, block, causal, kpm)
    want = _dense_released(q, k, v, tiles, block, scale, causal, kpm)
    assert torch.allclose(got, want, atol=1e-10)
    assert (got - out).abs().max() > 1e-2  # the two softmaxes differ here
    # by hand: row 0, non-causal, example 0 keeps tiles 0 and 2 (8 keys) of 12 -> 4 pruned; causal: row 0 sees 1 key
    n = pruned_count(idx, cnt, block, L, L, causal, kpm, B)
    # example 1 (keys 0..8): tiles 0 and 2 keep keys 0-3 and 8 of its 9 -> 4 pruned as well
    assert float(n[0, 0]) == (0.0 if causal else 4.0) and float(n[1, 0]) == (0.0 if causal else 4.0)
    assert float(n[0, 4]) == (0.0 if causal else 4.0)  # row 4: tiles 0, 1 (8 keys) of 12 (causal: 5 of 5)


def test_spion_with_pruned_logits_zero_compiles_runs_on_ort_and_saves(tmp_path):
    """Spion(pruned_logits="zero") end to end: each attention call is the released softmax of its own
    arguments (checked against the dense formula), ONNX Runtime and a saved-and-loaded model agree."""
    model, inputs = T.bert()
    recipe = sparsecc.Recipe(attention=sparsecc.Spion(block=4, quantile=0.5, kernel_size=3, pruned_logits="zero"),
                             ffn=None)
    sm = sparsecc.compile(model, inputs, recipe=recipe, calibration=[inputs], progress=False)
    nodes = [n for n in sm.graph_module.graph.nodes if n.target is pruned_as_logit_zero]
    assert len(nodes) == 2
    exact = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=sparsecc.Spion(
        block=4, quantile=0.5, kernel_size=3), ffn=None), calibration=[inputs], progress=False, plans=sm.plans)
    calls = T.op_calls(sm, inputs, torch.ops.sparsecc.block_sparse_attention.default)
    assert len(calls) == 2
    for (q, k, v, idx, cnt, block, scale, causal, kpm), _ in calls:
        tiles = torch.zeros(idx.shape[0], idx.shape[0], dtype=torch.bool)  # the layout serves up to 512 tokens
        for row in range(idx.shape[0]):
            tiles[row, idx[row, :int(cnt[row])].long()] = True
        tiles = tiles[:, :-(-k.shape[2] // block)]
        want = _dense_released(q.double(), k.double(), v.double(), tiles, block, scale, causal, kpm)
        out, lse = torch.ops.sparsecc.block_sparse_attention(q, k, v, idx, cnt, block, scale, causal, kpm)
        got = pruned_as_logit_zero(out, lse, q, k, idx, cnt, block, causal, kpm)
        assert torch.allclose(got.double(), want, atol=1e-5)
        assert kpm is not None and not bool(kpm.all())  # the example batch has padding
    got, ref = sm(**inputs).last_hidden_state, exact(**inputs).last_hidden_state
    assert (got - ref).abs().max() > 1e-3  # the two softmaxes differ on this model
    ort = sparsecc.compile(model, inputs, recipe=recipe, calibration=[inputs], progress=False, plans=sm.plans,
                           backend="onnxruntime")
    assert torch.allclose(ort(**inputs).last_hidden_state, got, atol=1e-4)
    sparsecc.save(sm, tmp_path / "m")
    assert torch.allclose(sparsecc.load(tmp_path / "m")(**inputs).last_hidden_state, got, atol=1e-6)
