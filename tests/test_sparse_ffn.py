"""sparsecc::sparse_ffn (Scaling Transformers sparse FFN) and its controller / training module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsecc.errors import LayoutError, UnsupportedError
from sparsecc.ops.sparse_ffn import (
    ACTIVATIONS,
    activation_fn,
    controller_select,
    pack_sparse_ffn_weights,
    sparse_ffn_reference,
)
from sparsecc.nn.sparse_ffn import (SparseFFN, SparseFFNController, anneal_dense_mix,
                                         init_controller_from_activations)

D_MODEL, D_FF, N, R = 16, 64, 8, 4
OP = torch.ops.sparsecc.sparse_ffn
NAMES = ("w_in", "b_in", "w_out_t", "b_out", "c1", "c2", "c_bias", "w_gate", "b_gate")


def make_weights(gated: bool = False, bias: bool = True, seed: int = 0, d_ff: int = D_FF,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) / shape[-1] ** 0.5).to(dtype).requires_grad_()

    w = dict(w_in=rnd(d_ff, D_MODEL), b_in=rnd(d_ff) if bias else None, w_out_t=rnd(d_ff, D_MODEL),
             b_out=rnd(D_MODEL) if bias else None, c1=rnd(D_MODEL, R), c2=rnd(R, d_ff),
             c_bias=rnd(d_ff) if bias else None, w_gate=rnd(d_ff, D_MODEL) if gated else None,
             b_gate=rnd(d_ff) if gated and bias else None)
    return w


def op_args(x: torch.Tensor, w: dict, n: int, act: str) -> tuple:
    return (x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], w["c1"], w["c2"], w["c_bias"], n, act,
            w["w_gate"], w["b_gate"])


def reference(x: torch.Tensor, w: dict, n: int, act: str) -> torch.Tensor:
    return sparse_ffn_reference(x, w["w_in"], w["b_in"], w["w_out_t"].t(), w["b_out"], w["c1"], w["c2"],
                                w["c_bias"], n, act, w["w_gate"], w["b_gate"])


def dense_ffn(x: torch.Tensor, w: dict, act: str) -> torch.Tensor:
    up = F.linear(x, w["w_in"], w["b_in"])
    h = activation_fn(up, act) if w["w_gate"] is None else activation_fn(F.linear(x, w["w_gate"], w["b_gate"]), act) * up
    return F.linear(h, w["w_out_t"].t(), w["b_out"])


def outputs_and_grads(fn, x: torch.Tensor, w: dict) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    out = fn()
    leaves = [x] + [w[k] for k in ("w_in", "b_in", "w_out_t", "b_out", "w_gate", "b_gate") if w[k] is not None]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return out, list(torch.autograd.grad(out, leaves, grad_out))


def assert_same(fn_a, fn_b, x: torch.Tensor, w: dict, atol: float = 1e-5) -> None:
    out_a, grads_a = outputs_and_grads(fn_a, x, w)
    out_b, grads_b = outputs_and_grads(fn_b, x, w)
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=1e-5)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, atol=atol, rtol=1e-5)


# Up to N / 2 = 4 tokens take the row-gather path, 15 tokens the dense-GEMM path.
SHAPES = [(1, D_MODEL), (2, D_MODEL), (D_MODEL,), (3, 5, D_MODEL)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_op_equals_masked_dense(shape, act, gated):
    w = make_weights(gated=gated)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).requires_grad_()
    assert_same(lambda: OP(*op_args(x, w, N, act)), lambda: reference(x, w, N, act), x, w)


@pytest.mark.parametrize("shape", [(1, D_MODEL), (4, 3, D_MODEL)], ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "swiglu"])
def test_n1_equals_dense_ffn(shape, gated):
    w = make_weights(gated=gated)
    act = "silu" if gated else "relu"
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).requires_grad_()
    assert_same(lambda: OP(*op_args(x, w, 1, act)), lambda: dense_ffn(x, w, act), x, w)


def test_selection_is_one_unit_per_block_and_controller_gets_no_gradient():
    w = make_weights()
    x = torch.randn(7, D_MODEL)
    idx = controller_select(x, w["c1"], w["c2"], w["c_bias"], N)
    assert idx.shape == (7, D_FF // N)
    assert torch.equal(idx // N, torch.arange(D_FF // N).expand(7, -1))
    out = OP(*op_args(x.requires_grad_(), w, N, "relu"))
    grads = torch.autograd.grad(out.sum(), [w["c1"], w["c2"], w["c_bias"]], allow_unused=True,
                                materialize_grads=True)
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_no_biases_and_float64():
    w = make_weights(bias=False, dtype=torch.float64)
    x = torch.randn(2, 3, D_MODEL, dtype=torch.float64, requires_grad=True)
    assert_same(lambda: OP(*op_args(x, w, N, "gelu")), lambda: reference(x, w, N, "gelu"), x, w, atol=1e-12)


@pytest.mark.parametrize("tokens", [1, 6])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_opcheck(tokens, gated):
    w = make_weights(gated=gated)
    x = torch.randn(tokens, D_MODEL, requires_grad=True)
    torch.library.opcheck(OP.default, op_args(x, w, N, "gelu_tanh"))


def test_pack_and_call_matches_reference_without_touching_inputs():
    w = make_weights(gated=True)
    w_out = w["w_out_t"].detach().t().clone()
    before = w_out.clone()
    packed = pack_sparse_ffn_weights(w["w_in"], w["b_in"], w_out, w["b_out"], w["c1"], w["c2"], w["c_bias"], N,
                                     "silu", w["w_gate"], w["b_gate"])
    x = torch.randn(2, 3, D_MODEL)
    torch.testing.assert_close(packed(x), reference(x, w, N, "silu"), atol=1e-5, rtol=1e-5)
    assert packed.w_out_t.is_contiguous() and torch.equal(w_out, before)


def test_bad_arguments_raise_actionable_errors():
    w = make_weights()
    x = torch.randn(2, D_MODEL)
    with pytest.raises(LayoutError, match="divide d_ff"):
        OP(*op_args(x, w, 7, "relu"))
    with pytest.raises(UnsupportedError, match="not supported"):
        OP(*op_args(x, w, N, "tanh"))
    w["w_out_t"] = w["w_out_t"].detach().t()
    with pytest.raises(LayoutError, match="w_out_t"):
        OP(*op_args(x, w, N, "relu"))


def test_torch_export_keeps_the_op():
    w = make_weights(gated=True)
    module = SparseFFN(w["w_in"], w["b_in"], w["w_out_t"].t(), w["b_out"], n=N, d_lowrank=R, activation="silu",
                       w_gate=w["w_gate"], b_gate=w["b_gate"]).eval()
    x = torch.randn(2, 5, D_MODEL)
    ep = torch.export.export(module, (x,))
    targets = [node.target for node in ep.graph.nodes if node.op == "call_function"]
    assert torch.ops.sparsecc.sparse_ffn.default in targets
    x2 = torch.randn(2, 5, D_MODEL)
    torch.testing.assert_close(ep.module()(x2), module(x2))


# ---------------------------------------------------------------- controller and training module


def test_controller_modes():
    torch.manual_seed(0)
    ctrl = SparseFFNController(D_MODEL, D_FF, N, R)
    x = torch.randn(3, 4, D_MODEL)
    eval_mask = ctrl.eval()(x).view(3, 4, -1, N)
    assert torch.equal(eval_mask.argmax(-1), controller_select(x, ctrl.c1, ctrl.c2, ctrl.bias, N) % N)
    ctrl.train()
    for st_prob, mode in ((1.0, "straight_through"), (0.0, "soft")):
        ctrl.st_prob = st_prob
        ctrl.zero_grad()
        mask = ctrl(x)
        assert ctrl.last_mode == mode and mask.shape == (3, 4, D_FF)
        blocks = mask.view(3, 4, -1, N)
        torch.testing.assert_close(blocks.sum(-1), torch.ones(3, 4, D_FF // N))
        if mode == "straight_through":  # forward value is exactly one-hot
            assert torch.equal((blocks == 1).sum(-1), torch.ones(3, 4, D_FF // N, dtype=torch.long))
            assert torch.equal((blocks == 0).sum(-1), torch.full((3, 4, D_FF // N), N - 1))
        else:
            assert (blocks > 0).all()
        (mask * torch.randn(mask.shape)).sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ctrl.parameters())


def test_st_probability_is_one_draw_per_batch():
    torch.manual_seed(0)
    ctrl = SparseFFNController(D_MODEL, D_FF, N, R).train()
    modes = []
    for _ in range(400):
        ctrl(torch.randn(5, D_MODEL))
        modes.append(ctrl.last_mode == "straight_through")
    assert 0.22 < sum(modes) / len(modes) < 0.38


def test_dense_to_sparse_warmup():
    w = make_weights()
    module = SparseFFN(w["w_in"], w["b_in"], w["w_out_t"].detach().t(), w["b_out"], n=N, d_lowrank=R,
                       activation="gelu")
    model = torch.nn.Sequential(module, torch.nn.Linear(D_MODEL, D_MODEL))
    x = torch.randn(4, 3, D_MODEL)
    dense = module.dense_hidden(x) @ module.w_out_t + module.b_out
    # Schedule: 1 at step 0, linear, 0 from the last warm-up step on; 0 warm-up steps = the paper's training.
    assert anneal_dense_mix(model, 0, 10) == 1 and module.controller.dense_mix == 1.0
    module.train()
    torch.testing.assert_close(module(x), dense, atol=1e-6, rtol=1e-6)  # all units on: the dense FFN
    anneal_dense_mix(model, 5, 10)
    assert module.controller.dense_mix == 0.5
    module.controller.st_prob = 1.0  # straight-through: forward mask 0.5 + 0.5 * one-hot
    blocks = module.controller(x).view(4, 3, -1, N)
    assert torch.equal((blocks == 1.0).sum(-1), torch.ones(4, 3, D_FF // N, dtype=torch.long))
    assert torch.equal((blocks == 0.5).sum(-1), torch.full((4, 3, D_FF // N), N - 1))
    for step in (10, 11, 500):
        anneal_dense_mix(model, step, 10)
        assert module.controller.dense_mix == 0.0
    anneal_dense_mix(model, 3, 0)
    assert module.controller.dense_mix == 0.0
    # Eval ignores the warm-up: arg-max mask through the sparse op.
    anneal_dense_mix(model, 0, 10)
    module.eval()
    c = module.controller
    expected = sparse_ffn_reference(x, module.w_in, module.b_in, module.w_out_t.t(), module.b_out, c.c1, c.c2,
                                    c.bias, N, "gelu")
    torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)
    assert anneal_dense_mix(torch.nn.Linear(2, 2), 0, 10) == 0
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        anneal_dense_mix(model, 0, -1)


def test_sparse_ffn_module_train_and_eval():
    w = make_weights()
    w_out = w["w_out_t"].detach().t().clone()
    originals = [t.detach().clone() for t in (w["w_in"], w["b_in"], w_out, w["b_out"])]
    module = SparseFFN(w["w_in"], w["b_in"], w_out, w["b_out"], n=N, d_lowrank=R, activation="gelu")
    x = torch.randn(4, 3, D_MODEL)
    # Training: masked dense product; gradients reach the controller and the weights.
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    module(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    opt.step()
    for orig, given in zip(originals, (w["w_in"], w["b_in"], w_out, w["b_out"])):
        assert torch.equal(orig, given.detach())  # the caller's tensors are untouched
    # Eval: the sparse op, equal to the dense FFN with the controller's one-hot mask.
    module.eval()
    c = module.controller
    expected = sparse_ffn_reference(x, module.w_in, module.b_in, module.w_out_t.t(), module.b_out, c.c1, c.c2,
                                    c.bias, N, "gelu")
    torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(module(x), F.linear(module.dense_hidden(x) * c(x), module.w_out_t.t(),
                                                       module.b_out), atol=1e-5, rtol=1e-5)


def test_from_linears():
    fc_in, fc_out, gate = torch.nn.Linear(D_MODEL, D_FF), torch.nn.Linear(D_FF, D_MODEL), torch.nn.Linear(D_MODEL, D_FF)
    module = SparseFFN.from_linears(fc_in, fc_out, gate=gate, n=1, d_lowrank=R, activation="silu").eval()
    x = torch.randn(3, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(module(x), fc_out(F.silu(gate(x)) * fc_in(x)), atol=1e-5, rtol=1e-5)


def test_init_controller_recovers_argmax_units():
    # The up projection has rank <= d_lowrank, so a rank-R controller can reproduce its pre-activations
    # exactly and must pick the true arg-max unit of every block.
    g = torch.Generator().manual_seed(4)
    d_ff, n, r = 128, 8, 6
    w_in = torch.randn(d_ff, r, generator=g) @ torch.randn(r, D_MODEL, generator=g) / D_MODEL**0.5
    b_in = torch.randn(d_ff, generator=g) * 0.1
    x = torch.randn(512, D_MODEL, generator=g)
    w_in_before = w_in.clone()
    fit = init_controller_from_activations(w_in, b_in, x, n, r, steps=100)
    assert fit.agreement >= 0.95 and fit.agreement_lstsq >= 0.95
    assert torch.equal(w_in, w_in_before)
    # Held-out tokens: the controller's choice is the unit with the largest relu activation.
    x_test = torch.randn(256, D_MODEL, generator=g)
    picked = fit.controller.select(x_test)
    truth = F.linear(x_test, w_in, b_in).view(256, -1, n).argmax(-1) + torch.arange(0, d_ff, n)
    assert (picked == truth).float().mean() >= 0.95


def test_init_controller_gated_improves_with_cross_entropy():
    g = torch.Generator().manual_seed(5)
    d_ff, n, r = 64, 8, 8
    w_in, w_gate = torch.randn(d_ff, D_MODEL, generator=g), torch.randn(d_ff, D_MODEL, generator=g)
    x = torch.randn(1024, D_MODEL, generator=g)
    fit = init_controller_from_activations(w_in, None, x, n, r, activation="silu", w_gate=w_gate, steps=100, lr=1e-2)
    assert fit.agreement > max(fit.agreement_lstsq - 0.02, 1.5 / n)  # far above chance
