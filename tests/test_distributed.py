"""Calibration and training on 2 real processes (gloo, CPU, a FileStore): the reduced statistics give the
plans of one process calibrating on all the batches, bit for bit; DDP training with the SPION switch gives
the run of one process on the whole batches; a rank with different plans, a rank that raises and a rank
that dies end the run on every rank with an error naming it."""

from __future__ import annotations

import datetime
import os
import tempfile
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import FSDPModule

import sparsecc
from sparsecc import distributed
from sparsecc import testing as T
from sparsecc.errors import DistributedError, InputError, UnsupportedError
from sparsecc.methods.token_flow.fit import calibrate_keep
from sparsecc.train.flow import fit_flow
from sparsecc.train.parallel import fully_shard_blocks, load_checkpoint
from sparsecc.train.spion import SpionSchedule, fit

WORLD = 2


def _recipe():
    return sparsecc.Recipe(attention=sparsecc.Spion(block=8, quantile=0.9),
                           ffn=sparsecc.SparseFFN(n=4, d_lowrank=4, steps=5, max_tokens=80))


def _batches(n: int = 4, seq: int = 32) -> list:
    out = []
    for i in range(n):
        ids = T._ids(seq=seq - 8 * (i % 2), seed=10 + i)  # two lengths: maps add into the top-left corner
        mask = torch.ones_like(ids)
        mask[i % 2, -(i + 1):] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _fit(batches: list, micro: int = 1, **options) -> dict:
    """SPION training of a small classifier: dense, the switch at the third map check (step 9), sparse.
    micro: the loss is the mean over that many equal micro-batches (gradient accumulation)."""
    torch.manual_seed(0)
    schedule = SpionSchedule(sparsecc.Spion(method="spion_cf", block=8, quantile=0.5, kernel_size=3),
                             check_every=3, threshold_pct=1e9, calibration_batches=2)

    def loss_fn(model, batch):
        parts = zip(batch[0].chunk(micro), batch[1].chunk(micro))
        return sum(torch.nn.functional.cross_entropy(model(x), y) for x, y in parts) / micro
    out = fit(T.CountingClassifier(), batches, loss_fn, steps=14, lr=3e-3, schedule=schedule, progress=False,
              **options)
    return {"losses": out.losses, "switched_at": out.switched_at, "deltas": out.deltas,
            "layouts": {k: v.mask.clone() for k, v in out.model.layouts.items()},
            "state": {k: v.detach().clone() for k, v in out.model.state_dict().items()}}


def _fsdp_model():
    model, inputs = T.bert("sdpa", seq=32)
    sm = sparsecc.compile(model, inputs, recipe=_recipe(), calibration=_batches(), progress=False)
    steps = [{"input_ids": T._ids(batch=4, seq=32, seed=20 + i), "attention_mask": torch.ones(4, 32, dtype=torch.long)}
             for i in range(3)]
    return sm, steps


def _train(module, steps: list) -> list:
    """AdamW steps on a distillation-like loss (the hidden states against fixed targets); the mean loss
    over the ranks."""
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    target = torch.randn(4, 32, 32, generator=torch.Generator().manual_seed(5))
    losses = []
    comm = distributed.current()
    for batch in steps:
        opt.zero_grad()
        hidden = module(**batch)[0]
        rows = slice(comm.rank * 2, comm.rank * 2 + 2) if comm else slice(None)
        loss = ((hidden - target[rows]) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(comm.mean(float(loss.detach())) if comm else float(loss.detach()))
    return losses


def _flowed(model, inputs, spread: bool = False):
    sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(keep=0.5)), progress=False)
    if spread:  # gate logits that differ by token (untrained, every gate opens with the same logit)
        table = sm.flow_gates.table
        with torch.no_grad():
            table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(3)))
    return sm


def _flow_batches() -> list:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(3):
        mask = torch.ones(4, 16, dtype=torch.long)
        mask[1 + i, 10:] = 0  # padding on one rank or the other
        out.append({"input_ids": torch.randint(0, T.VOCAB, (4, 16), generator=g), "attention_mask": mask})
    return out


def _finetune_batches() -> list:
    """Three batches of 4 with every token real: the rank means average to the whole batch's mean."""
    return [{"input_ids": T._ids(batch=4, seq=16, seed=30 + i), "attention_mask": torch.ones(4, 16, dtype=torch.long)}
            for i in range(3)]


def _finetune_compiled():
    model, inputs = T.bert()
    recipe = sparsecc.Recipe(attention=sparsecc.Fixed(pattern="local", block=4, density=0.5), ffn=None)
    return model, sparsecc.compile(model, inputs, recipe=recipe, progress=False)


def _finetuned(batches, **options) -> dict:
    model, sm = _finetune_compiled()
    result = sparsecc.finetune(sm, batches, teacher=model, steps=4, lr=1e-3, progress=False, **options)
    return {"losses": result.losses, "state": {k: v.detach().clone() for k, v in sm.state_dict().items()},
            "resumed_from": result.resumed_from}


class _Interrupted(Exception):
    pass


class _StopsAt:
    """Batches whose `at`-th read raises (an interrupted run)."""

    def __init__(self, batches: list, at: int):
        self.batches, self.at = batches, at

    def __iter__(self):
        for i, b in enumerate(self.batches):
            if i == self.at:
                raise _Interrupted
            yield b


def _digests(sm) -> dict:
    return {name: plan.digest() for name, plan in sm.plans.items()}


class _DiesAt:
    """Batches that end the process (no exception, no clean-up) when the second one is read."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        yield self.batches[0]
        os._exit(7)


def _worker(rank: int, store: str, out_dir: str, scenario: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    os.environ[distributed.TIMEOUT_ENV] = "20"
    model, inputs = T.bert("sdpa", seq=32)
    result: dict = {}
    try:
        if scenario == "plans":
            mine = distributed.shard(_batches())
            sm = sparsecc.compile(model, inputs, recipe=_recipe(), calibration=mine, progress=False)
            result["digests"] = _digests(sm)
            result["report"] = sm.report().distributed
            result["layouts"] = {k: v.mask.clone() for k, v in sm.layouts.items()}
            # the same plans, except that rank 1 holds one layout with a block flipped
            plans = dict(sm.plans)
            if rank == 1:
                name = sorted(n for n, p in plans.items() if "mask" in p.tensors)[0]
                changed = plans[name].tensors["mask"].clone()
                changed[-1, 0] = not changed[-1, 0]
                plans[name] = sparsecc.Plan(plans[name].method, name, dict(plans[name].values),
                                            {**plans[name].tensors, "mask": changed})
            try:
                sparsecc.compile(model, inputs, recipe=_recipe(), plans=plans, progress=False)
            except DistributedError as err:
                result["mismatch"] = str(err)
        elif scenario == "fit":
            result.update(_fit([(ids[rank * 8:(rank + 1) * 8], labels[rank * 8:(rank + 1) * 8])
                                for ids, labels in T.counting_batches(6)]))
        elif scenario == "fit_fsdp":
            result.update(_fit([(ids[rank * 8:(rank + 1) * 8], labels[rank * 8:(rank + 1) * 8])
                                for ids, labels in T.counting_batches(6)], fsdp={}))
        elif scenario == "flow":
            model, inputs = T.bert()
            mine = [{k: v[rank * 2:(rank + 1) * 2] for k, v in b.items()} for b in _flow_batches()]
            comm = distributed.current()
            result["calibrated"] = calibrate_keep(_flowed(model, inputs, spread=True), mine, comm=comm)
            sm = _flowed(model, inputs)
            trained = fit_flow(sm, mine, teacher=model, steps=10, gate_lr=0.3, hard_final=True, final_fraction=0.2,
                               progress=False)
            result.update(shifts=trained.shifts, history=trained.history,
                          state={k: v.clone() for k, v in sm.state_dict().items()})
        elif scenario == "flow_fsdp":  # the same runs under DDP and under FSDP2, from the same seed
            model, inputs = T.bert()
            mine = [{k: v[rank * 2:(rank + 1) * 2] for k, v in b.items()} for b in _flow_batches()]
            for how, options in (("ddp", {}), ("fsdp", {"fsdp": {}})):
                torch.manual_seed(0)
                sm = _flowed(model, inputs)
                trained = fit_flow(sm, mine, teacher=model, steps=10, gate_lr=0.3, hard_final=True,
                                   final_fraction=0.2, progress=False, **options)
                result[how] = {"shifts": trained.shifts, "history": trained.history,
                               "state": {k: v.clone() for k, v in sm.state_dict().items()}}
                torch.manual_seed(0)
                sm = _flowed(model, inputs)
                tuned = sparsecc.finetune(sm, mine, teacher=model, steps=4, lr=1e-3, progress=False, **options)
                result[how]["finetune"] = {"losses": tuned.losses, "table": sm.flow_gates.table.detach().clone(),
                                           "state": {k: v.clone() for k, v in sm.state_dict().items()}}
        elif scenario == "finetune":
            result.update(_finetuned([{k: v[rank * 2:(rank + 1) * 2] for k, v in b.items()}
                                      for b in _finetune_batches()]))
        elif scenario == "finetune_fsdp":
            mine = [{k: v[rank * 2:(rank + 1) * 2] for k, v in b.items()} for b in _finetune_batches()]
            result["whole"] = _finetuned(mine, fsdp={})
            ckpt = os.path.join(out_dir, "finetune")
            try:
                _finetuned(_StopsAt(mine, 2), fsdp={}, checkpoint=ckpt, checkpoint_every=1)
            except _Interrupted:
                pass
            dist.barrier()  # rank 0 writes the state file and removes the older folder after the others return
            result["files"] = sorted(os.listdir(ckpt))
            result["resumed"] = _finetuned(mine, fsdp={}, checkpoint=ckpt, checkpoint_every=1)
        elif scenario == "fsdp":
            sm, steps = _fsdp_model()
            sharded = fully_shard_blocks(sm)
            result["released"] = sum(p.numel() for p in sm.parameters())  # sm's own copies, until gather_into
            result["blocks"] = sharded.blocks
            result["groups"] = sum(isinstance(m, FSDPModule) for m in sharded.modules())
            result["sharded"] = all(type(p).__name__ == "DTensor" for p in sharded.parameters())
            result["at_rest"] = sum(p.to_local().numel() for p in sharded.parameters())
            result["losses"] = _train(sharded, [{k: v[rank * 2:(rank + 1) * 2] for k, v in b.items()} for b in steps])
            sharded.save_checkpoint(os.path.join(out_dir, "checkpoint"))
            sharded.gather_into(sm)
            result["state"] = {k: v.detach().clone() for k, v in sm.state_dict().items()}
        elif scenario == "raises":
            mine = distributed.shard(_batches())
            if rank == 1:
                mine = [mine[0], {"input_ids": mine[1]["input_ids"]}]  # a batch without its attention_mask
            try:
                sparsecc.compile(model, inputs, recipe=_recipe(), calibration=mine, progress=False)
            except DistributedError as err:
                result["raised"] = str(err)
            if rank == 1:
                torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
            mine = distributed.shard(_batches())
            try:
                sparsecc.compile(model, inputs, recipe=_recipe(), progress=False,
                                 calibration=_DiesAt(mine) if rank == 1 else mine)
            except DistributedError as err:
                result["died"] = str(err)
    finally:
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
        if scenario != "raises":
            dist.destroy_process_group()


def _spawn(scenario: str, keep: Optional[str] = None, wait: float = 120) -> tuple[list, list]:
    """Run `scenario` on WORLD processes; their results and exit codes (`keep`: a folder for what they write;
    `wait`: seconds each process is given, beyond which it counts as hung)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = keep or tmp
        ctx = mp.spawn(_worker, args=(os.path.join(tmp, "store"), out, scenario), nprocs=WORLD, join=False)
        for proc in ctx.processes:
            proc.join(wait)
        codes = [proc.exitcode for proc in ctx.processes]
        results = [torch.load(os.path.join(out, f"{r}.pt")) if os.path.exists(os.path.join(out, f"{r}.pt"))
                   else None for r in range(WORLD)]
    return results, codes


def test_two_ranks_make_the_plans_of_one_process_on_all_batches_and_catch_different_plans():
    results, codes = _spawn("plans")
    assert codes == [0, 0]
    model, inputs = T.bert("sdpa", seq=32)
    single = sparsecc.compile(model, inputs, recipe=_recipe(), calibration=_batches(), progress=False)
    expected = _digests(single)
    assert len(expected) == 4  # 2 attention layouts + 2 FFN controllers
    for r in results:
        assert r["digests"] == expected
        for name, mask in r["layouts"].items():
            assert torch.equal(mask, single.layouts[name].mask)
        assert r["report"]["world_size"] == WORLD and r["report"]["backend"] == "gloo"
    # rank 1 sends the 32 x 32 float64 map of the attention region rank 0 plans, and no FFN rows: rank 0's
    # tokens fill max_tokens (80) already; rank 0 sends a map and its first 80 rows of 32 floats
    assert 32 * 32 * 8 < results[1]["report"]["bytes_sent"] < 32 * 32 * 8 + 80 * 32 * 4
    assert 32 * 32 * 8 + 80 * 32 * 4 < results[0]["report"]["bytes_sent"] < 200_000
    for r in results:
        assert "plans differ across ranks: rank(s) [1] differ from rank 0" in r["mismatch"]


def test_a_rank_that_raises_or_dies_during_calibration_is_named_on_every_rank():
    results, codes = _spawn("raises")
    assert codes[1] == 7  # rank 1 died in the second scenario
    for r in results:
        assert "calibration failed on 1 of 2 rank(s): rank 1: InputError" in r["raised"]
        assert "attention_mask" in r["raised"]
    assert "died" not in results[1]
    assert "Ranks 1 failed to pass monitoredBarrier" in results[0]["died"]


def test_two_rank_ddp_training_with_the_spion_switch_equals_one_process_on_the_whole_batches():
    results, codes = _spawn("fit")
    assert codes == [0, 0]
    single = _fit(T.counting_batches(6))
    assert single["switched_at"] == 9 and len(single["layouts"]) == 2
    for r in results:
        assert r["switched_at"] == single["switched_at"]
        # the maps of the checks were summed over both halves: the deltas of the whole batches
        for mine, whole in zip(r["deltas"], single["deltas"], strict=True):
            assert mine == pytest.approx(whole, rel=1e-4)
        for name, mask in single["layouts"].items():  # layouts at the switch from both ranks' batches
            assert torch.equal(r["layouts"][name], mask)
        # each step: the mean over the ranks of their half-batch losses = the loss of the whole batch
        assert r["losses"] == pytest.approx(single["losses"], abs=1e-5)
        for name, whole in single["state"].items():
            mine = r["state"][name]
            if name.endswith("self_attn.in_proj_bias"):
                # the key bias: its true gradient is 0 (a shift of every score of a query), so AdamW turns
                # rounding noise into steps of +-lr; its moves differ up to 14 steps x lr, the rest match
                assert (mine[32:64] - whole[32:64]).abs().max() <= 14 * 3e-3
                mine, whole = torch.cat([mine[:32], mine[64:]]), torch.cat([whole[:32], whole[64:]])
            if whole.is_floating_point():
                assert (mine - whole).abs().max() < 1e-5, name
    # one process accumulating the gradients of the ranks' halves does DDP's arithmetic: equal bit for bit
    # (at the ranks' one thread: kernels that split work over threads may sum in another order)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        accumulated = _fit(T.counting_batches(6), micro=2)
    finally:
        torch.set_num_threads(threads)
    for name, value in accumulated["state"].items():
        assert torch.equal(value, results[0]["state"][name]), name


def test_spion_training_under_fsdp2_switches_at_the_same_step_and_trains_as_one_process():
    """fit(fsdp={}): the dense model sharded per layer, the checks on the gathered weights, the compiled model
    sharded per block after the switch (AdamW's sharded moments carried over): the switch step, the layouts,
    the losses and the weights of one process on the whole batches."""
    results, codes = _spawn("fit_fsdp", wait=300)
    assert codes == [0, 0]
    single = _fit(T.counting_batches(6))
    for r in results:
        assert r["switched_at"] == single["switched_at"] == 9
        for name, mask in single["layouts"].items():
            assert torch.equal(r["layouts"][name], mask)
        assert r["losses"] == pytest.approx(single["losses"], abs=1e-5)
        for name, whole in single["state"].items():
            mine = r["state"][name]
            if name.endswith("self_attn.in_proj_bias"):  # the key bias: see the DDP test
                assert (mine[32:64] - whole[32:64]).abs().max() <= 14 * 3e-3
                mine, whole = torch.cat([mine[:32], mine[64:]]), torch.cat([whole[:32], whole[64:]])
            if whole.is_floating_point():
                assert (mine - whole).abs().max() < 1e-5, name


def test_two_rank_flow_training_keeps_the_ranks_equal_and_sets_thresholds_on_all_their_tokens():
    results, codes = _spawn("flow")
    assert codes == [0, 0]
    model, inputs = T.bert()
    single = calibrate_keep(_flowed(model, inputs, spread=True), _flow_batches())
    halves = [calibrate_keep(_flowed(model, inputs, spread=True), [{k: v[r * 2:(r + 1) * 2] for k, v in b.items()}
                                                                    for b in _flow_batches()]) for r in range(2)]
    assert len(single) == 2 and all(abs(h[0] - single[0]) > 1e-2 for h in halves)  # each half alone: other shifts
    for r in results:  # thresholds on both ranks' halves = on the whole batches
        assert r["calibrated"] == pytest.approx(single, abs=1e-6)
    first, second = results
    assert first["shifts"] == second["shifts"] and len(first["shifts"]) == 2
    assert first["history"] == second["history"]  # means over the ranks
    assert abs(first["history"][-1]["kept"] - 0.5) <= 1 / 16
    for name, value in first["state"].items():  # DDP: one update on every rank
        assert torch.equal(value, second["state"][name]), name


def test_flow_training_and_finetune_under_fsdp2_equal_ddp():
    """fit_flow and finetune of a token-flow model sharded per block (the gates whole on every rank, their
    gradients averaged) train as under DDP from the same seed: per-step losses, kept fractions, calibrated
    thresholds and weights (gathered back into the model on every rank)."""
    results, codes = _spawn("flow_fsdp", wait=300)
    assert codes == [0, 0]
    for r in results:
        ddp, fsdp = r["ddp"], r["fsdp"]
        assert len(fsdp["history"]) == 10 and set(fsdp["shifts"]) == set(ddp["shifts"]) == {0, 1}
        for a, b in zip(ddp["history"], fsdp["history"]):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)
        assert all(abs(ddp["shifts"][s] - fsdp["shifts"][s]) < 1e-4 for s in ddp["shifts"])
        for name, value in ddp["state"].items():
            if value.is_floating_point():
                assert (fsdp["state"][name] - value).abs().max() < 1e-4, name
        tuned, tuned_ddp = fsdp["finetune"], ddp["finetune"]
        assert len(tuned["losses"]) == 4
        assert max(abs(a - b) for a, b in zip(tuned["losses"], tuned_ddp["losses"])) < 1e-5
        assert not torch.equal(tuned["table"], _flowed(*T.bert()).flow_gates.table)  # the gates trained
        for name, value in tuned_ddp["state"].items():
            if value.is_floating_point():
                assert (tuned["state"][name] - value).abs().max() < 1e-4, name
    for name, value in results[0]["fsdp"]["state"].items():  # every rank holds the same gathered model
        assert torch.equal(value, results[1]["fsdp"]["state"][name]), name


def test_two_rank_finetune_equals_one_process_on_the_whole_batches():
    """sparsecc.finetune under torch.distributed trains under DDP: the mean loss per step and the final
    weights of 2 ranks (each on half of every batch) equal one process on the whole batches."""
    results, codes = _spawn("finetune")
    assert codes == [0, 0]
    one = _finetuned(_finetune_batches())
    for r in results:
        assert max(abs(a - b) for a, b in zip(r["losses"], one["losses"])) <= 1e-5
        assert max((r["state"][k] - v).abs().max().item() for k, v in one["state"].items()) <= 1e-5


def test_finetune_under_fsdp2_equals_one_process_and_resumes_from_its_sharded_checkpoint(tmp_path):
    """finetune(fsdp={}) shards each block with FSDP2: losses and the weights gathered into the model equal
    one process on the whole batches; a run interrupted after 2 steps leaves the state file and one
    torch.distributed.checkpoint folder (no temporary one), and the resumed run equals the uninterrupted one."""
    results, codes = _spawn("finetune_fsdp", keep=str(tmp_path), wait=400)  # 3 runs: ~50 s on a quiet machine
    assert codes == [0, 0]
    one = _finetuned(_finetune_batches())
    for r in results:
        for run in (r["whole"], r["resumed"]):
            assert max(abs(a - b) for a, b in zip(run["losses"], one["losses"], strict=True)) <= 1e-5
            for name, value in one["state"].items():
                if value.is_floating_point() and not name.endswith("key.bias"):  # key bias: see the DDP test
                    assert (run["state"][name] - value).abs().max() <= 1e-5, name
        assert r["files"] == ["finetune-step2.dcp", "finetune.pt"]
        assert r["resumed"]["resumed_from"] == 2
        assert r["resumed"]["losses"][:2] == r["whole"]["losses"][:2]
        for name, value in r["whole"]["state"].items():
            assert torch.equal(r["resumed"]["state"][name], value), name
    for name, value in results[0]["whole"]["state"].items():  # every rank holds the gathered weights
        assert torch.equal(results[1]["whole"]["state"][name], value), name
    # the last checkpoint's weights (step 4, the end), read on one process into a freshly compiled model
    _, fresh = _finetune_compiled()
    load_checkpoint(fresh, str(tmp_path / "finetune" / "finetune-step4.dcp"))
    for name, value in fresh.named_parameters():
        assert torch.equal(value, results[0]["resumed"]["state"][name]), name


def test_fsdp2_with_one_group_per_block_trains_as_one_process(tmp_path):
    results, codes = _spawn("fsdp", keep=str(tmp_path))
    assert codes == [0, 0]
    sm, steps = _fsdp_model()
    total = sum(p.numel() for p in sm.parameters())
    single_losses = _train(sm, steps)
    single = sm.state_dict()
    for r in results:
        assert r["blocks"] == ["encoder.layer.0", "encoder.layer.1"]
        assert r["groups"] == 5  # embeddings, 2 blocks, the pooler after them, the root
        assert r["sharded"] and r["at_rest"] <= total // 2 + 64  # each rank holds about half
        assert r["released"] == 0
        assert r["losses"] == pytest.approx(single_losses, abs=1e-5)
        for name, value in single.items():
            if value.is_floating_point() and not name.endswith("key.bias"):  # key bias: see the DDP test
                assert (r["state"][name] - value).abs().max() < 1e-5, name
    # the distributed checkpoint (each rank wrote its shards) read on one process: the gathered weights
    fresh, _ = _fsdp_model()
    sparsecc.save(fresh, tmp_path / "compiled")  # as compiled, before training
    load_checkpoint(fresh, str(tmp_path / "checkpoint"))
    for name, value in fresh.named_parameters():
        assert torch.equal(value, results[0]["state"][name]), name
    loaded = sparsecc.load(tmp_path / "compiled", checkpoint=tmp_path / "checkpoint")
    trained = dict(fresh.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in loaded.named_parameters())
    assert torch.equal(loaded(**steps[0])[0], fresh(**steps[0])[0])
    other, _ = T.bert("sdpa", layers=1, seq=32)
    with pytest.raises(InputError, match="holds no complete distributed checkpoint"):
        load_checkpoint(fresh, str(tmp_path))
    with pytest.raises(UnsupportedError, match="does not fit this model: .* parameter"):
        load_checkpoint(sparsecc.compile(other, _fsdp_model()[1][0], progress=False), str(tmp_path / "checkpoint"))


def test_shard_is_contiguous_and_refuses_fewer_batches_than_ranks():
    assert [distributed.shard(range(5), r, 2) for r in (0, 1)] == [[0, 1], [2, 3, 4]]
    assert distributed.shard([1, 2]) == [1, 2]  # one process: everything
    with pytest.raises(DistributedError, match="1 calibration batch"):
        distributed.shard([1], 0, 2)


def test_torchrun_compile_splits_calibration_and_rank_0_writes_the_result(tmp_path):
    import json
    import subprocess
    import sys
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[attention]\nkind = "spion"\nblock = 8\nquantile = 0.9\n')
    out = tmp_path / "out"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    run = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "sparsecc.cli", "compile",
                          "sparsecc.testing:bert_sdpa", "--recipe", str(recipe), "--out", str(out), "--no-png"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["distributed"]["world_size"] == 2 and report["distributed"]["rank"] == 0
    assert sum(1 for r in report["regions"] if r.get("sparse")) == 2
    assert run.stdout.count("compiled model written to") == 1  # rank 1 computed the same and wrote nothing
    loaded = sparsecc.load(str(out / "model"))
    model, inputs = T.bert_sdpa()
    single = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=sparsecc.Spion(block=8, quantile=0.9)),
                              progress=False)
    assert {k: p.digest() for k, p in loaded.plans.items()} == _digests(single)


def test_commands_without_calibration_refuse_torchrun(monkeypatch, capsys):
    from sparsecc.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["inspect", "sparsecc.testing:bert"]) == 2
    assert "only compile and export split their calibration" in capsys.readouterr().err
