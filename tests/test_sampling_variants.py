"""Plan-aware sampling of module replacing (issue #25): the samplers draw what they claim, the
shipped recipe stays bit-identical (its card still verifies), and the ablation table merges
new rows into the shipped one."""
import json
import random
from dataclasses import asdict, replace

import pandas as pd
import pytest
import torch

from mtlab.modular import ModuleBank, Plan, enumerate_plans, ladders
from mtlab.modular.replacing import (PlanAwareConfig, PlanPool, PlanSampling, Replacer, ReplacingConfig,
                                     replacing_loss, sample_plans, train_modules)
from mtlab.train import TrainConfig

DEPTHS = {"encoder": 6, "decoder": 6}
GRANS = {"encoder": (2, 3, 6), "decoder": (2, 3, 6)}
BLOCKS = {"encoder": 100, "decoder": 150}


@pytest.fixture
def pool():
    return PlanPool(DEPTHS, GRANS, BLOCKS)


@pytest.fixture
def teacher6(g2p_task):
    from mtlab.teacher import TeacherConfig, build_teacher

    torch.manual_seed(0)
    return build_teacher(g2p_task.tokenizer, TeacherConfig(d_model=16, d_ff=32, num_heads=2, num_layers=6,
                                                           num_decoder_layers=6, dropout=0.0)).eval()


def draws(sampling, pool, steps=400, p=1.0, total=1000):
    out = []
    for step in range(steps):
        out.append(sample_plans(sampling, pool, step, total, p, random.Random(step)))
    return out


def key(spans):
    return str(Plan.of(spans))


def test_the_shipped_recipe_is_unchanged_and_its_card_still_verifies():
    from mtlab.experiments.artifacts import bank_card_config, bank_recipe
    from mtlab.shipped import config_diff
    from mtlab.teacher import ROOT

    assert "sampling" not in asdict(ReplacingConfig()) and "sampling" not in asdict(bank_recipe())
    card = json.loads((ROOT / "data" / "modules" / "card.json").read_text())
    assert config_diff(card["config"], bank_card_config(bank_recipe())) == []
    # a plan-aware recipe is another config: never mistaken for the shipped one
    assert config_diff(card["config"], bank_card_config(bank_recipe().with_sampling("ladder")))


def test_granular_sampler_at_p1_draws_only_uniform_tilings(pool):
    seen = {key(t) for ts in draws(PlanSampling(), pool) for t in ts}
    uniform = {f"e={a} d={b}" for a in ("222", "33", "6") for b in ("222", "33", "6")}
    assert seen <= uniform  # the gap the plan-aware samplers close: no mixed plan at p = 1


def test_ladder_sampler_draws_every_ladder_plan_and_nothing_else(pool):
    rungs = {str(p) for s, p in ladders(DEPTHS, GRANS, BLOCKS, names=("size_first", "speed_first")) if s != "teacher"}
    got = [t for ts in draws(PlanSampling("ladder"), pool, 600) for t in ts]
    assert all(len(ts) == 1 for ts in draws(PlanSampling("ladder"), pool, 20))
    assert {key(t) for t in got} == rungs
    assert "e=111111 d=111111" not in rungs and "e=111111 d=11112" in rungs  # the 1.1x rung is trained


def test_space_sampler_draws_uniformly_from_the_whole_space_without_the_teacher(pool):
    space = {str(p) for p in enumerate_plans(DEPTHS, GRANS)} - {"e=111111 d=111111"}
    got = [key(t) for ts in draws(PlanSampling("space"), pool, 4000) for t in ts]
    assert set(got) <= space and len(set(got)) > 0.9 * len(space)
    assert any("1" in g.split()[0] and "2" in g.split()[0] for g in got)  # mixed plans are drawn


def test_sandwich_trains_the_most_compressed_a_rung_and_a_granular_draw(pool):
    rungs = {key(t) for t in pool.ladder}
    for ts in draws(PlanSampling("sandwich"), pool, 50, p=0.3):
        assert len(ts) == 3
        assert key(ts[0]) == "e=6 d=6" and key(ts[1]) in rungs
        assert all(sum(v) == 6 for t in ts for v in t.values())


def test_mix_and_final_phase(pool):
    rungs = {key(t) for t in pool.ladder}
    mix = draws(PlanSampling("mix"), pool, 30)
    assert all(len(ts) == 2 and key(ts[1]) in rungs for ts in mix)
    final = PlanSampling("ladder_final", final_phase=0.25)
    early = [sample_plans(final, pool, s, 100, 1.0, random.Random(s))[0] for s in range(75)]
    late = [sample_plans(final, pool, s, 100, 1.0, random.Random(s))[0] for s in range(75, 100)]
    uniform = {f"e={a} d={b}" for a in ("222", "33", "6") for b in ("222", "33", "6")}
    assert {key(t) for t in early} <= uniform  # the recipe's draws at p = 1
    assert {key(t) for t in late} <= rungs and not {key(t) for t in late} <= uniform


def test_bad_sampling_options_name_the_fix():
    with pytest.raises(ValueError, match="use one of"):
        PlanSampling("ladders")
    with pytest.raises(ValueError, match="final_phase"):
        PlanSampling("ladder_final", final_phase=0)
    with pytest.raises(ValueError, match="strategies"):
        PlanSampling("ladder", strategies=())
    with pytest.raises(ValueError, match="unknown assembly strategy"):
        PlanPool(DEPTHS, GRANS, BLOCKS, ("size_frist",)).ladder


def test_granular_plan_aware_config_gives_the_recipe_s_loss_exactly(g2p_task, teacher6):
    bank = ModuleBank.build(teacher6, (2, 3, 6))
    model = Replacer(teacher6, bank)
    cfg = ReplacingConfig(train=TrainConfig(steps=100, batch_size=8))
    a, b = replacing_loss(cfg, 1), replacing_loss(cfg.with_sampling("granular"), 1)
    for step in (0, 40, 95):
        batch = g2p_task.collate("train", list(range(8)))
        (la, pa), (lb, pb) = a(model, batch, step), b(model, batch, step)
        assert la.item() == lb.item() and pa == pb


def test_sandwich_sums_the_loss_of_its_plans(g2p_task, teacher6):
    """With the local loss off, a sandwich step's loss is the sum of its plans' single-plan losses."""
    bank = ModuleBank.build(teacher6, (2, 3, 6))
    model = Replacer(teacher6, bank)
    cfg = ReplacingConfig(w_local=0.0, train=TrainConfig(steps=100, batch_size=8)).with_sampling("sandwich")
    batch = g2p_task.collate("train", list(range(8)))
    loss, parts = replacing_loss(cfg, 0)(model, batch, 60)
    assert parts["plans"] == 3
    plans = sample_plans(cfg.sampling, PlanPool(DEPTHS, bank.granularities, _bp(teacher6)), 60, 100, cfg.p_at(60),
                         random.Random(60))
    single = 0.0
    for t in plans:  # each plan alone, through a one-rung ladder
        one = replace(cfg, sampling=PlanSampling("ladder"))
        fn = replacing_loss(one, 0)
        pool = PlanPool(DEPTHS, bank.granularities, _bp(teacher6))
        pool.__dict__["ladder"] = [t]
        import mtlab.modular.replacing as R
        orig = R.PlanPool
        R.PlanPool = lambda *a, **k: pool  # noqa: E731
        try:
            single += fn(model, batch, 60)[0].item()
        finally:
            R.PlanPool = orig
    assert loss.item() == pytest.approx(single, rel=1e-5)


def _bp(teacher):
    from mtlab.modular.bank import block_params

    return block_params(teacher)


def test_plan_aware_training_runs_and_records_its_sampling(g2p_task, teacher6, tmp_path):
    cfg = ReplacingConfig(train=TrainConfig(steps=4, batch_size=8, warmup=1, log_every=1, ckpt_every=4)
                          ).with_sampling("sandwich")
    assert isinstance(cfg, PlanAwareConfig)
    bank, log = train_modules(teacher6, g2p_task, cfg, tmp_path, progress=False)
    assert (log.plans == 3).all() and log.loss.notna().all()
    saved = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert saved["config"]["sampling"]["sampler"] == "sandwich"
    with pytest.raises(Exception, match="sampling"):  # the same folder refuses the plain recipe
        train_modules(teacher6, g2p_task, replace(ReplacingConfig(), train=cfg.train), tmp_path, progress=False)


# ---- the ablation registry and its table ----------------------------------------------------

def test_variants_are_registered_with_distinct_keys():
    from mtlab.experiments.ablation import VARIANTS, variant_config

    names = {"ladder_plans", "space_uniform", "sandwich", "mix_ladder", "ladder_final_phase"}
    assert names <= set(VARIANTS)
    keys = {json.dumps(asdict(variant_config(n, 3000, 64)), sort_keys=True, default=str) for n in VARIANTS}
    assert len(keys) == len(VARIANTS)
    assert asdict(variant_config("recipe", 3000, 64, seed=0)) == asdict(
        __import__("mtlab.experiments.artifacts", fromlist=["bank_recipe"]).bank_recipe(3000, 64, eval_every=0))
    assert variant_config("sandwich", 3000, 64, seed=2).train.seed == 2


def test_new_rows_merge_into_the_shipped_table(tmp_path):
    from mtlab.experiments.ablation import ABLATION_CSV, equal_time_steps, read_rows, write_rows

    path = tmp_path / "ablation.csv"
    shipped = pd.read_csv(ABLATION_CSV)  # without the rows of the variants this test writes and asks for
    shipped = shipped[~shipped.variant.isin(["sandwich", "mix_ladder"])].reset_index(drop=True)
    shipped.to_csv(path, index=False)
    row = pd.DataFrame([{"variant": "sandwich", "steps": 3000, "batch_size": 64, "words": 1000, "seed": 0,
                         "device": "cpu", "train_seconds": 1800.0, "sec_per_step": 0.6, "dev_wer_1.1x": 42.0}])
    out = write_rows(row, path)
    assert len(out) == len(shipped) + 1
    kept = out[out.variant.isin(shipped.variant)].reset_index(drop=True)
    for col in shipped.columns:  # the shipped rows keep every value
        pd.testing.assert_series_equal(kept[col], shipped[col], check_names=False, check_dtype=False)
    assert (kept.device == "cpu").all() and (kept.seed == 0).all()
    assert kept.sec_per_step.tolist() == pytest.approx((shipped.train_seconds / shipped.steps).tolist())
    again = write_rows(row.assign(train_seconds=900.0, sec_per_step=0.3), path)  # same id: replaced
    assert len(again) == len(out) and again.set_index("variant").loc["sandwich", "sec_per_step"] == 0.3
    more = write_rows(row.assign(seed=1), path)  # another seed: appended
    assert len(more) == len(out) + 1
    table = read_rows(path)
    recipe_cost = float(shipped.set_index("variant").loc["recipe", "train_seconds"]) / 3000
    assert equal_time_steps(table, "sandwich") == round(3000 * recipe_cost / 0.45)  # mean over the two seeds
    with pytest.raises(ValueError, match="--only mix_ladder"):  # a variant with no row at this budget yet
        equal_time_steps(table, "mix_ladder")


def test_cli_refuses_cuda_without_a_gpu(capsys):
    from mtlab.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        main(["ablation", "--only", "recipe", "--device", "cuda", "--steps", "5"])
    assert "use --device cpu" in capsys.readouterr().err


def test_step_costs_measure_every_variant_against_the_recipe():
    from mtlab.experiments.ablation import step_costs

    df = step_costs(["sandwich"], batch_size=4, min_run_time=0.01, device="cpu")
    assert df.variant.tolist() == ["recipe", "sandwich"] and df.vs_recipe.iloc[0] == 1.0
    assert (df.sec_per_step > 0).all() and (df.device == "cpu").all()


def test_a_rerun_without_only_trains_only_what_the_table_lacks(tmp_path, monkeypatch):
    from mtlab.experiments import ablation

    path = tmp_path / "ablation.csv"
    path.write_text(ablation.ABLATION_CSV.read_text())
    trained = []

    def fake_row(name, steps, batch_size, words, progress=True, *, seed=0, device=None):
        trained.append(name)
        return pd.DataFrame([{"variant": name, "steps": steps, "batch_size": batch_size, "words": words,
                              "seed": seed, "device": device, "train_seconds": 1.0, "sec_per_step": 1.0 / steps}])

    monkeypatch.setattr(ablation, "variant_row", fake_row)
    shipped = set(pd.read_csv(path).variant)
    t = ablation.ablation_table(3000, variants=None, progress=False, device="cpu", csv=path, skip_done=True)
    assert set(trained) == set(ablation.VARIANTS) - shipped and set(t.variant) == set(trained)
    trained.clear()
    ablation.ablation_table(3000, variants=["recipe"], progress=False, device="cpu", csv=path)
    assert trained == ["recipe"]  # named explicitly: rerun (its row is then replaced)
