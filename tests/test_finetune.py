"""sparsecc.finetune: distillation from the dense teacher for any recipe; evaluation, best weights, resume."""

import pytest
import torch

import sparsecc
from sparsecc import testing as T
from sparsecc.errors import DistributedError, InputError, UnsupportedError


def _batches(n: int, seed: int, seq: int = 16) -> list[dict]:
    return T.token_batches(n, seed, batch=2, seq=seq)


def _compiled(recipe=None):
    torch.manual_seed(0)
    model, inputs = T.bert()
    recipe = recipe or sparsecc.Recipe(attention=sparsecc.Fixed(pattern="local", block=2, density=0.2),
                                       ffn=sparsecc.SparseFFN(n=8, d_lowrank=4, steps=5))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = sparsecc.compile(model, inputs, recipe=recipe, calibration=_batches(2, 1), progress=False)
    return model, sm


def test_finetune_lowers_the_held_out_distillation_loss_and_never_touches_the_teacher():
    model, sm = _compiled()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # the teacher's mode is restored afterwards
    held_out = _batches(2, 7)
    result = sparsecc.finetune(sm, _batches(4, 3), teacher=model, steps=24, lr=3e-4, eval_batches=held_out,
                               eval_every=8, progress=False)
    assert [e["step"] for e in result.evals] == [0, 8, 16, 24] and len(result.history) == 24
    assert result.best_loss < 0.7 * result.evals[0]["loss"]  # the held-out distance before training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not sm.training


def test_best_evaluated_weights_are_kept():
    model, sm = _compiled()
    result = sparsecc.finetune(sm, _batches(4, 3), teacher=model, steps=12, lr=5e-2, eval_batches=_batches(1, 7),
                               eval_every=3, progress=False)  # a large lr: later evaluations may be worse
    best = min(result.evals, key=lambda e: e["loss"])
    assert (result.best_step, result.best_loss) == (best["step"], best["loss"])
    b = _batches(1, 7)[0]
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(sm(**b)[0], model(**b)[0], dim=-1)
    now = float(((1 - cos) * b["attention_mask"]).sum() / b["attention_mask"].sum())
    assert now == pytest.approx(result.best_loss, abs=1e-6)


class _Interrupt(Exception):
    pass


def _interrupted(batches: list, after: int):
    """Yields the batches, then raises once `after` batches were taken (a session that ends mid-run)."""
    def gen():
        for i, b in enumerate(batches * 100):
            if i == after:
                raise _Interrupt()
            yield b
    return gen()


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    batches, held_out = _batches(3, 3), _batches(1, 7)
    kw = dict(steps=8, lr=3e-3, eval_batches=held_out, eval_every=2, checkpoint_every=3, progress=False)
    model, straight = _compiled()
    whole = sparsecc.finetune(straight, batches, teacher=model, checkpoint=str(tmp_path / "a"), **kw)

    model, first = _compiled()
    with pytest.raises(_Interrupt):
        sparsecc.finetune(first, _interrupted(batches, 7), teacher=model, checkpoint=str(tmp_path / "b"), **kw)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["finetune.pt"]  # no half-written file
    model, second = _compiled()
    resumed = sparsecc.finetune(second, batches, teacher=model, checkpoint=str(tmp_path / "b"), **kw)
    assert resumed.resumed_from == 6
    assert resumed.losses == whole.losses and resumed.evals == whole.evals
    for (name, a), (_, b) in zip(straight.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_token_flow_gates_train_through_the_method_hooks():
    model, sm = _compiled(sparsecc.Recipe(attention=None, ffn=None, flow=sparsecc.TokenFlow(keep=0.5)))
    table = sm.flow_gates.table.detach().clone()
    result = sparsecc.finetune(sm, _batches(2, 3), teacher=model, steps=4, lr=1e-3, progress=False)
    assert {"distill", "penalty", "balance"} <= set(result.history[0])
    assert not torch.equal(sm.flow_gates.table, table)  # the "gates" group trained at its own lr


def test_finetune_says_what_it_needs():
    model, sm = _compiled()
    with pytest.raises(InputError, match="pass teacher=<the model you compiled>"):
        sparsecc.finetune(sm, _batches(1, 3), steps=2)
    with pytest.raises(InputError, match="expected a model compiled by sparsecc.compile"):
        sparsecc.finetune(model, _batches(1, 3), teacher=model, steps=2)
    with pytest.raises(InputError, match="loss='kl' needs outputs with .logits"):
        sparsecc.finetune(sm, _batches(1, 3), teacher=model, steps=1, loss="kl", progress=False)
    with pytest.raises(InputError, match="steps must be a positive int"):
        sparsecc.finetune(sm, _batches(1, 3), teacher=model, steps=0)
    with pytest.raises(DistributedError, match="needs torch.distributed initialised"):
        sparsecc.finetune(sm, _batches(1, 3), teacher=model, steps=1, fsdp={}, progress=False)
    ort = sparsecc.compile(model, T.bert()[1], recipe=sparsecc.Recipe(attention=None, ffn=None),
                           backend="onnxruntime", progress=False)
    with pytest.raises(UnsupportedError, match="does not train"):
        sparsecc.finetune(ort, _batches(1, 3), teacher=model, steps=2)
