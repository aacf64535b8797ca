"""sparsecc.tune: the search finds known optima, budgets hold on held-out data, the latency table is cached,
a budget nothing meets says so with the best point; the Budget metrics against hand-computed cases."""

import json
import math
import os
import re
import warnings

import pytest
import torch

import sparsecc
from sparsecc import testing as T
from sparsecc.errors import InputError, TuneError
from sparsecc.tune import Budget, search
from sparsecc.tune.budget import neighbour_overlap

FFN_LEVELS = [sparsecc.SparseFFN(n=4, d_lowrank=4, steps=5), sparsecc.SparseFFN(n=8, d_lowrank=4, steps=5)]
# given latencies (seconds): deterministic, where a measured table on a tiny model is noise
FFN_LATENCY = {"dense": 1.0, "ffn:sparse_ffn(n=4, d_lowrank=4, steps=5)": 0.8,
               "ffn:sparse_ffn(n=8, d_lowrank=4, steps=5)": 0.6}


def _batches(n: int, seed: int, seq: int = 16) -> list[dict]:
    return T.token_batches(n, seed, batch=4, seq=seq)


def _one_insensitive_layer():
    """A 2-layer BERT whose layer 1 FFN adds almost nothing (output x 1e-3) and whose layer 0 FFN dominates
    its residual (x 20): sparsifying layer 1 costs no quality, layer 0 a lot."""
    model, inputs = T.bert(layers=2)
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight.mul_(1e-3)
        model.encoder.layer[1].output.dense.bias.mul_(1e-3)
        model.encoder.layer[0].output.dense.weight.mul_(20)
    return model, inputs


def _tune(model, inputs, **kwargs):
    args = dict(calibration=_batches(2, 1), eval_batches=_batches(2, 5), methods={"ffn": FFN_LEVELS},
                cache_dir=None, latency=FFN_LATENCY, repeats=2, warmup=0, progress=False)
    args.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsecc.tune(model, inputs, **args)


def test_tune_finds_the_known_optimum_where_one_layer_is_insensitive_and_one_is_not():
    model, inputs = _one_insensitive_layer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _tune(model, inputs, budget="cosine>=0.999")
    # the optimum: the insensitive layer at the level that saves most, the sensitive one dense
    assert result.recipe.config_for("ffn", 1) == FFN_LEVELS[1]
    assert result.recipe.config_for("ffn", 0) is None
    assert result.recipe.attention is None and result.recipe.flow is None
    assert result.quality >= 0.999
    # the sensitivity stage measured the sensitive layer below the budget at both levels
    sensitive = [p for p in result.points if p["levels"].startswith("0.ffn=sparse") and "1.ffn=dense" in p["levels"]]
    assert len(sensitive) == 2 and all(p["quality"] < 0.999 for p in sensitive)
    # the table predicts dense 1.0 s less one region's saving of (1.0 - 0.6) / 2
    assert result.predicted_latency == pytest.approx(0.8)
    assert math.isfinite(result.speedup) and result.latency > 0  # timed end to end on the backend
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched
    # deterministic for a seed
    again = _tune(model, inputs, budget="cosine>=0.999")
    assert again.recipe == result.recipe and again.quality == result.quality


def test_the_tuned_recipe_meets_its_budget_on_the_held_out_data_when_compiled_again(tmp_path):
    """Both slots, the top-k neighbour metric: the written recipe, compiled from its file with calibration on
    the same batches, measures what tune reported on the held-out batches, within the budget."""
    model, inputs = T.bert(layers=2)
    attention = [sparsecc.Spion(method="spion_c", block=4, density=0.5)]
    latency = dict(FFN_LATENCY, **{"attention:spion(method='spion_c', block=4, density=0.5)": 0.9})
    calibration, held = _batches(2, 1), _batches(3, 5)
    result = _tune(model, inputs, budget="top3>=0.75", methods={"attention": attention, "ffn": FFN_LEVELS},
                   calibration=calibration, eval_batches=held, latency=latency)
    assert result.budget.met(result.quality)
    assert any(p["slot"] == "both" for p in result.uniform) and len(result.uniform) == 1 + 2 + 2
    paths = result.save(str(tmp_path / "tuned"))
    assert {p.rsplit("/", 1)[1] for p in paths} >= {"recipe.toml", "front.json", "summary.txt"}
    recipe = sparsecc.Recipe.load(str(tmp_path / "tuned" / "recipe.toml"))
    assert recipe == result.recipe
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = sparsecc.compile(model, inputs, recipe=recipe, calibration=calibration, progress=False)
        dense = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe.dense(), progress=False)
    with torch.no_grad():
        again = result.budget.measure([sm(**b) for b in held], [dense(**b) for b in held], held)
    assert again == pytest.approx(result.quality, abs=1e-6) and result.budget.met(again)
    front = json.loads((tmp_path / "tuned" / "front.json").read_text())
    assert front["budget"] == "top3>=0.75" and front["front"] and front["recipe"] == recipe.to_dict()
    qualities = [p["quality"] for p in front["front"]]
    assert qualities == sorted(qualities)  # a Pareto front: slower points only when better


def test_the_latency_table_and_the_plans_are_measured_once_and_read_from_the_cache(tmp_path):
    model, inputs = T.bert(layers=2)
    first = _tune(model, inputs, budget="cosine>=0.5", latency=None, cache_dir=str(tmp_path))
    assert first.table["measured"] == 2 and first.table["cached"] == 0 and first.plans_cached == 0
    names = sorted(f.name for f in tmp_path.iterdir())  # one table, one plan file per level, no temporary file
    assert len(names) == 3 and names[0].startswith("latency-") and all(n.startswith("plans-") for n in names[1:])
    # another budget: nothing is calibrated or timed again, and the plans read back compile the same models
    second = _tune(model, inputs, budget="cosine>=0.9", latency=None, cache_dir=str(tmp_path))
    assert second.table["measured"] == 0 and second.table["cached"] == 2 and second.plans_cached == 2
    assert second.table["entries"] == first.table["entries"]
    assert second.uniform == first.uniform  # the qualities of the same levels, measured again from cached plans
    # other calibration data: other plans
    third = _tune(model, inputs, budget="cosine>=0.5", latency=None, cache_dir=str(tmp_path),
                  calibration=_batches(2, 2))
    assert third.plans_cached == 0 and len(list(tmp_path.iterdir())) == 5


def test_a_budget_nothing_meets_is_an_error_with_the_best_point_found():
    model, inputs = T.bert(layers=2)
    # the dense model's outputs have mse 0 to themselves; every sparse level changes them
    with pytest.raises(TuneError, match=r"no sparse setting meets the budget mse<=0 .*best measured was mse "
                                        r"[0-9.e-]+ \(0\.ffn=") as err:
        _tune(model, inputs, budget="mse<=0")
    assert err.value.best["quality"] > 0 and "sparse_ffn" in err.value.best["levels"]


def test_tune_refuses_bad_arguments_with_what_to_do():
    model, inputs = T.bert(layers=2)
    with pytest.raises(InputError, match="at least 2"):
        sparsecc.tune(model, inputs, calibration=_batches(1, 1), progress=False)
    with pytest.raises(InputError, match="METRIC>=VALUE"):
        _tune(model, inputs, budget="cosine=0.9")
    with pytest.raises(InputError, match="token flow is searched alone"):
        _tune(model, inputs, methods=["flow", "ffn"])
    with pytest.raises(InputError, match="differ in more than their kept fraction"):
        _tune(model, inputs, methods={"flow": [sparsecc.TokenFlow(gate="content"), sparsecc.TokenFlow(keep=0.7)]})
    with pytest.raises(InputError, match="flow_fit="):
        _tune(model, inputs, methods=["flow"], flow_fit=100)
    with pytest.raises(InputError, match="expected SparseFFN configs"):
        _tune(model, inputs, methods={"ffn": [sparsecc.Spion()]})
    with pytest.raises(InputError, match="'dense'"):
        _tune(model, inputs, latency={"ffn:x": 1.0})


def test_budget_parsing_and_directions():
    assert Budget.parse("cosine>=0.98") == Budget("cosine", min=0.98)
    assert Budget.parse(" kl <= 0.05 ") == Budget("kl", max=0.05)
    assert str(Budget.parse("top10>=0.9")) == "top10>=0.9"
    with pytest.raises(InputError, match="higher-is-better"):
        Budget("cosine", max=0.1)
    with pytest.raises(InputError, match="lower-is-better"):
        Budget.parse("mse>=0.1")
    with pytest.raises(InputError, match="not known"):
        Budget.parse("accuracy>=0.9")
    b = Budget("kl", max=0.1)
    assert b.met(0.1) and not b.met(0.11) and b.slack(0.02) == pytest.approx(0.08) and b.better(0.01, 0.02)


def test_metrics_against_hand_computed_values():
    # pooled over the mask: example 0 has tokens [1,0],[3,0] -> mean [2,0]; example 1 only its first token [0,1]
    teacher = [torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[0.0, 1.0], [5.0, 5.0]]])]
    student = [torch.tensor([[[2.0, 0.0], [2.0, 0.0]], [[1.0, 1.0], [9.0, 9.0]]])]
    batches = [{"attention_mask": torch.tensor([[1, 1], [1, 0]])}]
    # cosine: example 0: [2,0] vs [2,0] -> 1; example 1: [1,1] vs [0,1] -> 1/sqrt(2)
    assert Budget("cosine", min=0).measure(student, teacher, batches) == pytest.approx((1 + 2 ** -0.5) / 2)
    # mse per kept token, over its features: tokens (0,0), (0,1) and (1,0) each 0.5; (1,1) is masked out
    assert Budget("mse", max=1).measure(student, teacher, batches) == pytest.approx(0.5)
    assert Budget("kl", max=1).measure(teacher, teacher, batches) == pytest.approx(0.0, abs=1e-7)
    # neighbours at k=1: teacher rows 0,1 near each other, 2,3 near each other; the student swaps 1 and 3
    t = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    s = torch.tensor([[1.0, 0.0], [0.1, 0.9], [0.0, 1.0], [0.9, 0.1]])
    # student neighbours: 0->3, 1->2, 2->1, 3->0; teacher: 0->1, 1->0, 2->3, 3->2: none shared
    assert neighbour_overlap(s, t, 1) == 0.0 and neighbour_overlap(t, t, 1) == 1.0
    # k=2: teacher 0->{1,3}, 1->{0,3}, 2->{3,1}, 3->{2,1}; student 0->{3,1}, 1->{2,3}, 2->{1,3}, 3->{0,1}
    assert neighbour_overlap(s, t, 2) == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)
    with pytest.raises(InputError, match="needs more than 4"):
        neighbour_overlap(s, t, 4)
    assert Budget(lambda s_, t_, b_: 0.25, min=0.2).measure([], [], []) == 0.25


def test_search_finds_the_brute_force_optimum_of_an_additive_problem():
    """Four units with three levels each; quality falls additively by a per-unit weight per level. The
    search must reach the lowest latency any candidate within the budget has (found by enumeration)."""
    import itertools
    weights = [0.001, 0.02, 0.004, 0.05]
    saving = [[0.0, 1.0, 1.8, 2.5], [0.0, 1.0, 1.8, 2.5], [0.0, 0.5, 0.9, 1.2], [0.0, 2.0, 3.5, 4.0]]
    space = search.SearchSpace(units=[("ffn", i) for i in range(4)], levels=[3] * 4, savings=saving)
    seen = []

    def quality(c):
        seen.append(c)
        return 1.0 - sum(w * lv * (1 + 0.1 * lv) for w, lv in zip(weights, c))
    budget = Budget("cosine", min=0.95)
    sens = search.sensitivity(space, quality)
    best = search.seed(space, sens, quality, budget, 1.0)
    best = search.evolve(space, best, quality, budget, seed_value=3, generations=40, offspring=4, patience=40)
    best, _ = search.shift(space, best, quality, budget)
    optimum = max((space.latency_saving(c) for c in itertools.product(range(4), repeat=4)
                   if budget.met(quality(c))))
    assert budget.met(best.quality) and best.latency_saving == pytest.approx(optimum)
    points = [{"latency": 1.0, "quality": 0.9}, {"latency": 2.0, "quality": 0.95}, {"latency": 2.5, "quality": 0.93},
              {"latency": 3.0, "quality": 0.99}, {"latency": 0.5, "quality": 0.5}]
    assert [p["latency"] for p in search.pareto(points, True)] == [0.5, 1.0, 2.0, 3.0]  # 2.5 is dominated
    assert [p["latency"] for p in search.pareto(points, False)] == [0.5]


def test_tune_with_finetune_measures_the_shift_after_fine_tuning_and_returns_that_model():
    model, inputs = _one_insensitive_layer()
    # both layers sparse measure cosine 0.9938 as they are; 20 steps of distillation raise it (to 0.9998)
    result = _tune(model, inputs, budget="cosine>=0.99", finetune={"steps": 20, "lr": 1e-3})
    assert result.finetuned and result.budget.met(result.quality)
    plain = next(p["quality"] for p in result.points if p["levels"] == result.chosen["levels"])
    assert result.quality > plain and all(result.recipe.config_for("ffn", i) == FFN_LEVELS[1] for i in range(2))
    assert result.model.backend == "eager" and result.model.recipe == result.recipe
    # the fine-tuned model's own outputs give the quality reported
    held = _batches(2, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe.dense(), progress=False)
    with torch.no_grad():
        again = result.budget.measure([result.model(**b) for b in held], [dense(**b) for b in held], held)
    assert again == pytest.approx(result.quality, abs=1e-6)


def test_tune_returns_the_answer_without_fine_tuning_when_fine_tuning_makes_it_worse():
    """A learning rate that wrecks the model: the shift finds nothing fine-tuned within the budget, the evolved
    answer fine-tuned is worse than without, so it is returned as the search measured it."""
    model, inputs = _one_insensitive_layer()
    result = _tune(model, inputs, budget="cosine>=0.999", finetune={"steps": 2, "lr": 1.0})
    assert result.recipe.config_for("ffn", 1) == FFN_LEVELS[1] and not result.finetuned
    assert result.chosen["finetuned_quality"] < result.quality and result.budget.met(result.quality)
    held = _batches(2, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe.dense(), progress=False)
    with torch.no_grad():  # the model returned is the one measured, not the fine-tuned one
        again = result.budget.measure([result.model(**b) for b in held], [dense(**b) for b in held], held)
    assert again == pytest.approx(result.quality, abs=1e-6)


def test_tune_with_finetune_never_fine_tunes_the_dense_answer():
    """Where no level saves time, the answer is the dense model: it is the teacher, so it is not fine-tuned
    (AdamW's lr-sized steps on a near-zero gradient moved it away from itself) and its quality is exact."""
    model, inputs = _one_insensitive_layer()
    slower = {"dense": 1.0, **{k: 1.2 for k in FFN_LATENCY if k != "dense"}}
    result = _tune(model, inputs, budget="cosine>=0.9", latency=slower, finetune={"steps": 3, "lr": 1e-2})
    assert all(result.recipe.config_for("ffn", i) is None for i in range(2))
    assert not result.finetuned and result.quality == pytest.approx(1.0, abs=1e-6)
    held = _batches(2, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe.dense(), progress=False)
    with torch.no_grad():
        for b in held:
            assert (result.model(**b).last_hidden_state - dense(**b).last_hidden_state).abs().max() < 1e-5


def test_a_tuned_recipe_slower_than_dense_end_to_end_gives_the_dense_model(monkeypatch):
    """The table predicts a saving; the end-to-end timing (here: made slower) decides."""
    import importlib
    tuner = importlib.import_module("sparsecc.tune.tuner")  # (sparsecc.tune is also the function)
    model, inputs = _one_insensitive_layer()
    # the latency table timed "here" (made up, as the end-to-end timing): a given latency= would not decide
    monkeypatch.setattr(tuner, "interleaved_medians", lambda fns, repeats, warmup: [1.0, 1.25][:len(fns)])
    table = {"dense_seconds": 1.0, "regions": 2}
    monkeypatch.setattr(tuner.LatencyTable, "put", lambda self, level, seconds, dense, regions: None)
    monkeypatch.setattr(tuner._Tuner, "measure_latency", lambda self, t, *a: t.entries.update(
        {k: dict(table, seconds=v, dense_seconds=1.0) for k, v in FFN_LATENCY.items() if k != "dense"}))
    with pytest.warns(UserWarning, match=r"measured 1250.00 ms end to end on eager, the dense model 1000.00 ms "
                                         r"beside it \(the latency table predicted 800.00 ms .*the dense one"):
        result = sparsecc.tune(model, inputs, calibration=_batches(2, 1), eval_batches=_batches(2, 5),
                               methods={"ffn": FFN_LEVELS}, cache_dir=None, budget="cosine>=0.999",
                               repeats=1, warmup=0, progress=False)
    assert result.recipe == sparsecc.Recipe.dense() and result.quality == 1.0 and result.speedup == 1.0
    assert result.chosen["slower_end_to_end"]["levels"] == "0.ffn=dense 1.ffn=sparse_ffn(n=8, d_lowrank=4, steps=5)"


FLOW_LEVELS = [sparsecc.TokenFlow(gate="content", keep=0.75), sparsecc.TokenFlow(gate="content", keep=0.5)]
FLOW_LATENCY = {"dense": 1.0, "flow:token_flow(gate='content', keep=0.75)": 0.8, "flow:token_flow(gate='content')": 0.6}


def test_tune_searches_flow_keeps_per_layer_from_one_training_of_the_gates(tmp_path, monkeypatch):
    """Layer 1 adds almost nothing (its attention and FFN outputs x 1e-3: under post-LN it is near the identity),
    layer 0 dominates (its FFN x 20): the optimum flows layer 1 at the lowest keep and leaves layer 0 dense."""
    import sparsecc.train.flow as flow_training
    model, inputs = _one_insensitive_layer()
    with torch.no_grad():
        model.encoder.layer[1].attention.output.dense.weight.mul_(1e-3)
        model.encoder.layer[1].attention.output.dense.bias.mul_(1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainings = []
    fit_flow = flow_training.fit_flow
    monkeypatch.setattr(flow_training, "fit_flow", lambda *a, **k: trainings.append(k["steps"]) or fit_flow(*a, **k))
    args = dict(budget="cosine>=0.999", methods={"flow": FLOW_LEVELS}, latency=FLOW_LATENCY, flow_fit={"steps": 3},
                cache_dir=str(tmp_path))
    result = _tune(model, inputs, **args)
    assert trainings == [3]  # one training for both levels
    flow = result.recipe.flow
    assert flow.skip == (0,) and flow.keep[1] == 0.5 and flow.gate == "content"
    assert result.recipe.attention is None and result.recipe.ffn is None
    assert result.predicted_latency == pytest.approx(0.8)  # dense less one block's saving of (1.0 - 0.6) / 2
    # layer 0 alone at either keep misses the budget; so the sensitivity stage measured
    sensitive = [p for p in result.points if p["levels"].startswith("0.flow=token") and "1.flow=dense" in p["levels"]]
    assert len(sensitive) == 2 and all(p["quality"] < 0.999 for p in sensitive)
    # the tuned model: only block 1 is routed, at about half of the held-out tokens, and its outputs give the quality
    held = _batches(2, 5)
    kept = result.model.measure_flow(held)
    assert list(kept) == ["encoder.layer.1"] and kept["encoder.layer.1"] == pytest.approx(0.5, abs=0.15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe.dense(), progress=False)
    with torch.no_grad():
        again = result.budget.measure([result.model(**b) for b in held], [dense(**b) for b in held], held)
    assert again == pytest.approx(result.quality, abs=1e-6) and result.budget.met(again)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched
    # a second tune reads both levels' gates from the cache: no training, the same answer
    second = _tune(model, inputs, **args)
    assert trainings == [3] and second.plans_cached == 2
    assert second.recipe == result.recipe and second.quality == result.quality


# ------------------------------------------------------------------ the command line
def _bert_dir_with_tokenizer(path):
    """A small random BERT saved as a Hugging Face directory, with MiniLM's tokenizer (same vocabulary)."""
    import shutil

    from transformers import BertConfig, BertModel

    from sparsecc.models import minilm_dir
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)
    model = BertModel(cfg).eval()
    with torch.no_grad():  # peaked attention that carries weight in the residual: sparse attention shows
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(8)
            layer.attention.self.key.weight.mul_(8)
            layer.attention.output.dense.weight.mul_(20)
    model.save_pretrained(path)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(minilm_dir(), name), path)
    return str(path)


def test_cli_tune_writes_the_recipe_the_front_and_a_model_that_meets_the_budget_on_held_out_text(tmp_path, capsys):
    from sparsecc.capture import call_with_inputs
    from sparsecc.cli import main
    from sparsecc.models import load_model, text_batches
    model_dir = _bert_dir_with_tokenizer(tmp_path / "bert")
    out = tmp_path / "tuned"
    argv = ["tune", model_dir, "--budget", "cosine>=0.998", "--methods", "attention", "--seq-len", "32", "--batch",
            "4", "--calibration-batches", "2", "--eval-batches", "3", "--generations", "3", "--repeats", "2",
            "--warmup", "0", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-png",
            "--latency", str(tmp_path / "latency.json")]
    # seconds "from the target device": each level saves more than the last, so the tune picks sparse layers
    levels = [f"attention:spion(method='spion_c', block=8, density={d})" for d in (0.5, 0.35, 0.25, 0.125)]
    (tmp_path / "latency.json").write_text(json.dumps({"dense": 1.0, **dict(zip(levels, (0.9, 0.8, 0.7, 0.6)))}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tuned recipe on eager: cosine" in printed and "written recipe.toml" in printed
    assert sorted(p.name for p in out.iterdir()) == ["front.json", "model", "recipe.toml", "summary.txt"]
    front = json.loads((out / "front.json").read_text())
    recipe = sparsecc.Recipe.load(str(out / "recipe.toml"))
    assert front["budget"] == "cosine>=0.998" and front["recipe"] == recipe.to_dict() and front["quality"] >= 0.998
    assert len(front["uniform"]) == 4 and all(u["slot"] == "attention" for u in front["uniform"])
    # no uniform setting meets the budget; the per-layer mix does: layer 0 dense, layer 1 at the cheapest level
    assert max(u["quality"] for u in front["uniform"]) < 0.998
    assert recipe.config_for("attention", 0) is None and recipe.config_for("attention", 1).density == 0.125
    assert front["predicted_latency"] == pytest.approx(0.8) and front["quality"] < 1.0
    # the saved model, re-measured by this test on the held-out text the command drew, meets the budget
    loaded = load_model(model_dir, batch=4, seq_len=32)
    held = text_batches(loaded, 3, 32, batch_size=4, offset=4 * 2 * 4)
    calibration = text_batches(loaded, 2, 32, batch_size=4)
    assert not {tuple(r.tolist()) for b in held for r in b["input_ids"]} & {
        tuple(r.tolist()) for b in calibration for r in b["input_ids"]}  # held out: no calibration row
    tuned = sparsecc.load(str(out / "model"))
    with torch.no_grad():
        student = [call_with_inputs(tuned, b) for b in held]
        teacher = [loaded.model(**b) for b in held]
    assert Budget.parse("cosine>=0.998").measure(student, teacher, held) == pytest.approx(front["quality"], abs=1e-5)


def test_cli_tune_of_flow_keeps_writes_a_model_whose_trained_gates_give_the_quality_reported(tmp_path, capsys):
    from sparsecc.capture import call_with_inputs
    from sparsecc.cli import main
    from sparsecc.models import load_model, text_batches
    model_dir = _bert_dir_with_tokenizer(tmp_path / "bert")
    out = tmp_path / "tuned"
    keeps = {"flow:token_flow(gate='content', keep=0.9)": 0.95, "flow:token_flow(gate='content', keep=0.75)": 0.85,
             "flow:token_flow(gate='content', keep=0.6)": 0.75, "flow:token_flow(gate='content')": 0.7}
    (tmp_path / "latency.json").write_text(json.dumps({"dense": 1.0, **keeps}))
    argv = ["tune", model_dir, "--budget", "cosine>=0.9", "--methods", "flow", "--flow-steps", "2", "--seq-len", "32",
            "--batch", "4", "--calibration-batches", "2", "--eval-batches", "2", "--generations", "2", "--repeats",
            "1", "--warmup", "0", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-png",
            "--latency", str(tmp_path / "latency.json")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 0
    front = json.loads((out / "front.json").read_text())
    recipe = sparsecc.Recipe.load(str(out / "recipe.toml"))
    assert recipe.flow is not None and len(recipe.flow.keep) == 2 and front["quality"] >= 0.9
    assert len(front["uniform"]) == 4 and all(u["slot"] == "flow" for u in front["uniform"])
    # the saved model carries the trained, calibrated gates: re-measured here, it gives the quality reported
    loaded = load_model(model_dir, batch=4, seq_len=32)
    held = text_batches(loaded, 2, 32, batch_size=4, offset=4 * 2 * 4)
    tuned = sparsecc.load(str(out / "model"))
    with torch.no_grad():
        student = [call_with_inputs(tuned, b) for b in held]
        teacher = [loaded.model(**b) for b in held]
    assert Budget.parse("cosine>=0.9").measure(student, teacher, held) == pytest.approx(front["quality"], abs=1e-5)
    # (open gates, untrained, would keep every token: the quality would be 1)
    assert front["quality"] < 0.9999


@pytest.mark.parametrize("extra, message", [
    (["--budget", "cosine=0.9"], "--budget 'cosine=0.9': .*METRIC>=VALUE"),
    (["--eval-batches", "1"], "expected an integer >= 2"),
    (["--latency", "/nonexistent/latency.json"], "--latency /nonexistent/latency.json: cannot read it as JSON"),
    (["--eval-batches", "500"], "draw on 16128 docstring paragraphs; [0-9]+ are available"),
])
def test_cli_tune_refuses_bad_arguments_before_any_work(tmp_path, capsys, extra, message):
    from sparsecc.cli import main
    try:
        code = main(["tune", "minilm", "--out", str(tmp_path / "o"), *extra])
    except SystemExit as exit_:  # argparse's checks
        code = exit_.code
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_cli_tune_on_a_model_without_a_tokenizer_says_to_use_the_python_api(tmp_path, capsys):
    from sparsecc.cli import main
    assert main(["tune", "sparsecc.testing:bert", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "has none (no tokenizer.json or vocab.txt)" in err and "sparsecc.tune(model" in err

