"""Measurement helpers: parameter accounting, FLOPs, latency, each as a DataFrame."""
import torch

from mtlab.measure import forward_flops, generate_flops, latency, param_table, stack_params


def test_param_table_adds_up_and_splits_by_stack(tiny_t5):
    df = param_table(tiny_t5)
    total = sum(p.numel() for p in tiny_t5.parameters())  # parameters() yields tied weights once
    assert df.loc[df.component == "total", "params"].item() == total
    assert df[df.component != "total"].params.sum() == total
    assert set(df["stack"]) == {"encoder", "decoder", "-"}
    ff = df[(df.component == "ff") & (df["stack"] == "encoder")].params.item()
    assert ff == 2 * 2 * 16 * 32  # 2 layers x (wi + wo), no bias
    assert stack_params(tiny_t5) == df[df["stack"] != "-"].params.sum()


def test_tied_parameters_are_counted_once(tiny_t5):
    before = param_table(tiny_t5)
    blocks = tiny_t5.encoder.block
    blocks[1].layer[-1].DenseReluDense.wi.weight = blocks[0].layer[-1].DenseReluDense.wi.weight
    after = param_table(tiny_t5)
    saved = before.set_index(["component", "stack"]).params - after.set_index(["component", "stack"]).params
    assert saved[("ff", "encoder")] == 16 * 32 and saved[("total", "-")] == 16 * 32


def test_flops_scale_with_depth(g2p_task, tiny_t5):
    batch = g2p_task.collate("dev", list(range(8)))
    df = forward_flops(tiny_t5, batch.model_inputs())
    parts = df.set_index("part").flops
    assert parts["total"] > parts["encoder"] > 0 and parts["decoder"] > 0
    assert parts["encoder"] + parts["decoder"] <= parts["total"]
    tiny_t5.encoder.block = torch.nn.ModuleList(list(tiny_t5.encoder.block)[:1])
    tiny_t5.decoder.block = torch.nn.ModuleList(list(tiny_t5.decoder.block)[:1])
    tiny_t5.config.num_layers = tiny_t5.config.num_decoder_layers = 1
    assert forward_flops(tiny_t5, batch.model_inputs()).set_index("part").flops["encoder"] < parts["encoder"]
    assert generate_flops(tiny_t5, batch.input_ids, batch.attention_mask, max_new_tokens=4) > 0


def test_latency_table_times_every_model_on_the_same_inputs(g2p_task, tiny_t5):
    df = latency({"a": tiny_t5, "b": tiny_t5}, g2p_task, batch_sizes=(1, 4), min_run_time=0.05, max_new_tokens=3)
    assert list(df.model) == ["a", "b", "a", "b"] and list(df.batch_size) == [1, 1, 4, 4]
    assert (df.seconds > 0).all() and (df.threads == torch.get_num_threads()).all()
    assert (df[df.model == "a"].speedup_vs_first == 1.0).all()


def test_speedup_spread_and_suspects():
    from mtlab.measure import NOISY_SPREAD, ratio_stats, suspect

    s = ratio_stats([1.0, 1.0, 1.0], [0.5, 0.5, 0.5])
    assert s == {"speedup": 2.0, "spread": 0.0} and suspect(s) == "" and suspect(s, ideal=2.2) == ""
    assert "FLOP-ideal" in suspect(s, ideal=10.0) and "FLOP-ideal" in suspect(s, ideal=1.0)
    wide = ratio_stats([1.0, 1.0, 1.0], [0.5, 0.25, 1.0])   # ratios 2, 4, 1: IQR 1.5 over median 2
    assert wide["speedup"] == 2.0 and wide["spread"] == 0.75 > NOISY_SPREAD and "rounds disagree" in suspect(wide)
