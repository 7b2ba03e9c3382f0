"""Exploring the spaces: enumeration, prefix-shared screening (== per-plan == assembled models)."""
import pytest
import torch

from mtlab.explore.screen import block_evals_per_plan, max_abs_diff, screen, screen_per_plan
from mtlab.explore.space import AssemblySpace, CombinedSpace, MergeSpace, merge_specs, window_sets
from mtlab.modular import ModuleBank, Plan, assemble


def _perturbed_bank(teacher, ks=(2, 3, 6)):
    """Modules unlike any teacher layer (T5's position bias included), so sharing bugs show."""
    torch.manual_seed(1)
    bank = ModuleBank.build(teacher, ks)
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return bank.train()  # as a bank fresh from training: the screen must switch its dropout off


@pytest.fixture
def t5_6(g2p_task):
    from mtlab.teacher import TeacherConfig, build_teacher

    torch.manual_seed(0)
    return build_teacher(g2p_task.tokenizer, TeacherConfig(d_model=16, d_ff=32, num_heads=2, num_layers=6,
                                                           num_decoder_layers=6, dropout=0.1)).eval()


@pytest.fixture
def bart4(g2p_task):
    import transformers as T

    torch.manual_seed(0)
    return T.BartForConditionalGeneration(T.BartConfig(
        d_model=16, encoder_layers=4, decoder_layers=4, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=len(g2p_task.tokenizer), max_position_embeddings=64,
        dropout=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=0,
        forced_eos_token_id=None, init_std=0.3)).eval()


def test_space_sizes_match_brute_force():
    a = AssemblySpace({"encoder": 6, "decoder": 6}, {"encoder": (2, 3, 6), "decoder": (2, 3, 6)})
    assert a.sizes() == {"encoder": 14, "decoder": 14, "plans": 196}
    plans = list(a)
    assert len(set(map(str, plans))) == 196
    for p in plans:
        p.validate(a.depths, a.granularities)
    # window sets: brute force over subsets of windows
    from itertools import combinations
    wins = [(s, k) for k in range(2, 7) for s in range(0, 7 - k)]
    brute = [c for r in range(0, 4) for c in combinations(wins, r)
             if all(a1 + k1 <= a2 for (a1, k1), (a2, _) in zip(sorted(c), sorted(c)[1:]))]
    assert len(window_sets(6)) == len(brute)
    m = MergeSpace({"encoder": 6, "decoder": 6})
    assert len(m) == len(brute) ** 2 - 1 == sum(1 for _ in m)
    c = CombinedSpace(AssemblySpace({"encoder": 4}, {"encoder": (2,)}), sizes=(2,))
    assert len(c) == sum(1 for _ in c)
    assert merge_specs({"decoder": [(1, 3)]}) == ["decoder:1-3@middle/permute"]


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_prefix_shared_screen_equals_per_plan_and_assembled_models(g2p_task, t5_6, bart4, family):
    teacher = t5_6 if family == "t5" else bart4
    bank = _perturbed_bank(teacher, (2, 3, 6) if family == "t5" else (2, 4))
    shared = screen(teacher, bank, g2p_task, limit=40, batch_size=16, progress=False)
    plain = screen_per_plan(teacher, bank, g2p_task, limit=40, batch_size=16, progress=False)
    assert len(shared) == len(AssemblySpace.of(teacher, bank))
    assert max_abs_diff(shared, plain) < 1e-5
    plans = [Plan.parse(p) for p in shared.plan]
    assert shared.attrs["block_evals"] < plain.attrs["block_evals"] == block_evals_per_plan(plans) * 3
    # and against real assembled models (a fresh HF model per plan)
    import torch.nn.functional as F
    batch = g2p_task.collate("dev", list(range(40)))
    for p in plans[:: max(1, len(plans) // 6)]:
        m = assemble(teacher, bank, p)
        with torch.no_grad():
            logits = m(**batch.model_inputs()).logits
        mask = batch.labels != -100
        nll = F.cross_entropy(logits[mask], batch.labels[mask]).item()
        row = screen(teacher, bank, g2p_task, [p], limit=40, batch_size=40, progress=False).iloc[0]
        assert abs(row.nll - nll) < 1e-5, str(p)
    teacher_row = shared.set_index("plan").loc[str(Plan.teacher({s: n for s, n in bank.depths.items()}))]
    assert teacher_row.ratio == pytest.approx(1.0)


def test_screen_refuses_bad_input(g2p_task, t5_6):
    bank = ModuleBank.build(t5_6, (2,))
    with pytest.raises(ValueError, match="test"):
        screen(t5_6, bank, g2p_task, split="test", limit=8, progress=False)
    with pytest.raises(ValueError, match="granularity 3"):
        screen(t5_6, bank, g2p_task, ["e=33 d=111111"], limit=8, progress=False)


def _shown_code(out: str) -> str:
    import html
    import re

    return html.unescape(re.search(r"<pre[^>]*>(.*?)</pre>", out, re.S)[1])


def _same_weights(a, b) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_explorers_export_the_pick_and_show_code_that_does_the_same(g2p_task, tiny_t5, tmp_path, monkeypatch):
    """Export from both explorers: plain transformers reloads and generates; the code shown writes the same
    weights; a foreign folder is refused with export's message."""
    import numpy as np
    import pandas as pd
    import transformers

    import mtlab.experiments.modular as modular
    import mtlab.teacher
    from mtlab.candidate import CompressionSpec, apply
    from mtlab.experiments.explore import assembly_code, merge_code
    from mtlab.modular import block_params
    from mtlab.surgery import stack_depths
    from mtlab.widgets import AssemblyExplorer, MergeExplorer

    teacher = tiny_t5.eval()
    bank = ModuleBank.build(teacher, (2,)).eval()
    depths = stack_depths(teacher)
    scr = screen(teacher, bank, g2p_task, limit=8, batch_size=8, progress=False)
    e = AssemblyExplorer(scr, depths, bank.granularities, block_params(teacher),
                         build=lambda p: assemble(teacher, bank, p), task=g2p_task, code=assembly_code("smoke"))
    e.custom.value = "e=2 d=11"
    assert e.export_dir.value == "exports/e2_d11"          # a default folder named after the plan
    e.export_dir.value = str(tmp_path / "asm")
    e.export_button.click()
    assert "exported e=2 d=11 to" in e.export_out.value and "from_pretrained" in e.export_out.value
    net = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "asm").eval()
    assert len(net.encoder.block) == 1 and len(net.decoder.block) == 2
    batch = g2p_task.collate("dev", [0, 1])
    out = net.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=4)
    assert out.shape[0] == 2
    # the code shown does the same
    monkeypatch.setattr(mtlab.teacher, "load_teacher", lambda *a, **k: (teacher, g2p_task))
    monkeypatch.setattr(modular, "trained_bank", lambda *a, **k: (bank, None))
    code = _shown_code(e.export_out.value).replace(str(tmp_path / "asm"), str(tmp_path / "asm-code"))
    assert "Plan.parse('e=2 d=11')" in code
    exec(compile(code, "shown", "exec"), {})
    assert _same_weights(tmp_path / "asm", tmp_path / "asm-code")
    # a folder of someone else's files: refused, untouched, the message says why and how
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert e.export(mine) is None
    assert "not exported" in e.export_out.value and "overwrite" in e.export_out.value and "#b00" in e.export_out.value
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]

    sim = {s: pd.DataFrame(np.eye(n) * 0.5 + 0.5) for s, n in depths.items()}
    m = MergeExplorer(sim, depths, lambda specs: {"params": 1, "dev_per": 1.0, "n": 1}, params=lambda specs: 1,
                      build=lambda specs: apply(teacher, CompressionSpec(None, tuple(specs))), task=g2p_task,
                      code=merge_code(200))
    m.controls["encoder"]["method"].value = "vanilla"
    m.export(tmp_path / "merge")
    assert "exported encoder:0-1@middle/vanilla" in m.export_out.value and "before recovery" in m.export_out.value
    net = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merge").eval()
    out = net.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=4)
    assert out.shape[0] == 2
    code = _shown_code(m.export_out.value).replace(str(tmp_path / "merge"), str(tmp_path / "merge-code"))
    exec(compile(code, "shown", "exec"), {})
    assert _same_weights(tmp_path / "merge", tmp_path / "merge-code")
