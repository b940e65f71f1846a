import base64
import csv
import json
import math
from html.parser import HTMLParser

import pytest

from gatedmoe.arena import leaderboard, run_tabular_arena, run_text_arena, write_outputs
from gatedmoe.data import load_tabular

TEXT = "to be or not to be, that is the question: whether 'tis nobler in the mind to suffer\n" * 30
TINY_LM = dict(n_layers=1, d_model=16, n_heads=2, seq_len=16, n_experts=4, d_hidden=16)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.cells, self.tags = [], [], []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))
        self._in_cell = tag in ("td", "th")

    def handle_endtag(self, tag):
        self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells.append(data)


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    out = tmp_path_factory.mktemp("arena")
    text = run_text_arena(TEXT, ["topk_softmax", "hash"], steps=3, seeds=2, batch_size=2, eval_every=2,
                          eval_batches=1, model=TINY_LM, progress=False)
    table = run_tabular_arena(load_tabular("wine"), ["gumbel_softmax", "hash"], steps=4, seeds=1,
                              model=dict(d_model=8, d_hidden=8), progress=False)
    return out, [text, table], write_outputs([text, table], out, meta={"command": "test"})


def test_leaderboard_mean_std_over_seeds(arena):
    _, (text, table), _ = arena
    rows = leaderboard(text)
    assert {r["label"] for r in rows} == {"topk_softmax", "hash"} and all(r["seeds"] == 2 for r in rows)
    assert rows[0]["val_loss"] <= rows[1]["val_loss"]
    for r in rows:
        runs = [x["val_loss"] for x in text.runs if x["label"] == r["label"]]
        assert r["val_loss"] == pytest.approx(sum(runs) / 2)
        assert r["val_loss_std"] == pytest.approx(abs(runs[0] - runs[1]) / 2**0.5)
    hash_row = next(r for r in rows if r["label"] == "hash")
    assert hash_row["entropy_norm"] is None and hash_row["active_params"] < hash_row["params"]
    # Hash needs token ids: skipped on the table; the MLP has the MoE's parameter count.
    trows = {r["label"]: r for r in leaderboard(table)}
    assert set(trows) == {"gumbel_softmax", "mlp (equal params)"}
    # Within one unit of MLP width (about 3% at this tiny size).
    assert abs(trows["mlp (equal params)"]["params"] - trows["gumbel_softmax"]["params"]) < 0.05 * trows["gumbel_softmax"]["params"]
    assert trows["mlp (equal params)"]["load_cv"] is None and 0 <= trows["gumbel_softmax"]["val_accuracy"] <= 1
    assert table.config["skipped_gates"] == ["hash"]


def test_outputs_json_csv_and_plots(arena):
    out, _, paths = arena
    doc = json.loads(paths["json"].read_text())
    assert [t["task"] for t in doc["tasks"]] == ["text", "tabular"]
    assert len(doc["tasks"][0]["runs"]) == 4
    rows = list(csv.DictReader(paths["csv"].open()))
    assert {r["label"] for r in rows} == {"topk_softmax", "hash", "gumbel_softmax", "mlp (equal params)"}
    names = {p.name for p in paths["figures"]}
    assert {"text_loss_curves.png", "text_entropy.png", "text_load_topk_softmax.png", "text_load_hash.png",
            "text_coactivation.png", "text_char_experts.png", "tabular_loss_curves.png",
            "tabular_load_gumbel_softmax.png"} <= names
    for p in paths["figures"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000


def test_html_report_parses_and_embeds_images(arena):
    _, _, paths = arena
    page = _Page()
    page.feed(paths["html"].read_text(encoding="utf-8"))
    page.close()
    assert page.tags.count("table") == 2
    assert len(page.images) == len(paths["figures"])
    for img in page.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix) and img["alt"]
        assert base64.b64decode(img["src"][len(prefix):])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "topk_softmax" in page.cells and "mlp (equal params)" in page.cells


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown gate"):
        run_text_arena(TEXT, ["nope"], steps=1)
    with pytest.raises(ValueError, match="seeds"):
        run_text_arena(TEXT, ["topk_softmax"], steps=1, seeds=0)


def test_parallel_jobs_match_serial():
    kw = dict(steps=2, seeds=1, batch_size=2, eval_every=2, eval_batches=1, model=TINY_LM, progress=False)
    serial = run_text_arena(TEXT, ["topk_softmax", "switch"], **kw)
    parallel = run_text_arena(TEXT, ["topk_softmax", "switch"], jobs=2, **kw)
    assert [r["val_loss"] for r in parallel.runs] == pytest.approx([r["val_loss"] for r in serial.runs], rel=1e-5)
    assert set(parallel.stats) == {"topk_softmax", "switch"}


def test_gate_preset_is_a_moe_config_on_a_base():
    from gatedmoe.arena import TEXT_MOE, gate_preset

    base = TEXT_MOE.replace(d_model=16, n_experts=4)
    assert gate_preset("topk_softmax", base=base) == base
    assert gate_preset("sigmoid", base=base) == base.replace(gate="sigmoid", bias_update_rate=1e-2)
    assert gate_preset("hash", 30, base=base) == base.replace(gate="hash", gate_kwargs={"vocab_size": 30})
    with pytest.raises(ValueError, match="unknown gate"):
        gate_preset("nope")


def test_text_contestants_carry_the_preset_moe_config(monkeypatch):
    import gatedmoe.arena.runner as runner
    from gatedmoe.arena import TEXT_MOE, gate_preset

    seen = []

    def fake_run(task, progress, threads):
        seen.append(task["cfg"])
        return {"label": task["cfg"].moe.gate, "seed": task["seed"]}, None

    monkeypatch.setattr(runner, "_text_run", fake_run)
    base = TEXT_MOE.replace(k=1, capacity_factor=2.0)
    res = run_text_arena(TEXT, ["topk_softmax", "sigmoid", "hash"], steps=1, model=dict(TINY_LM, moe_every=2),
                         moe=base, progress=False)
    vocab = len(res.vocab)
    want_base = base.replace(d_model=16, n_experts=4, d_hidden=16)
    assert [c.moe for c in seen] == [gate_preset(g, vocab, base=want_base) for g in ("topk_softmax", "sigmoid", "hash")]
    assert all((c.d_model, c.n_layers, c.seq_len, c.moe_every) == (16, 1, 16, 2) for c in seen)
    assert res.config["moe"]["capacity_factor"] == 2.0 and res.config["moe"]["k"] == 1
    assert res.config["gates"] == {"topk_softmax": {}, "sigmoid": {"bias_update_rate": 1e-2},
                                   "hash": {"gate_kwargs": {"vocab_size": vocab}}}
    json.dumps(res.config)


def test_tabular_contestants_carry_the_preset_moe_config(monkeypatch):
    import gatedmoe.arena.runner as runner
    from gatedmoe.arena import TABULAR_MOE, gate_preset

    nets = []

    def fake_train(net, split, task, **kw):
        nets.append(net)
        return {"final_val_loss": 1.0, "params": 100, "active_params": 50, "routing": {}, "rows_per_s": 1.0,
                "train_seconds": 0.1, "val_loss": [], "routing_stats": None}

    monkeypatch.setattr(runner, "train_tabular", fake_train)
    run_tabular_arena(load_tabular("wine"), ["gumbel_softmax", "sigmoid"], steps=1, model=dict(d_model=8, d_embed=4),
                      progress=False)
    want = TABULAR_MOE.replace(d_model=8)
    assert [n.moe.config for n in nets[:2]] == [gate_preset(g, base=want) for g in ("gumbel_softmax", "sigmoid")]
    assert nets[0].embed.weight.shape == (13, 4)


def test_variants_are_contestants_on_each_gate_preset(monkeypatch):
    import gatedmoe.arena.runner as runner
    from gatedmoe.arena import TEXT_MOE, gate_preset

    seen = []

    def fake_run(task, progress, threads):
        seen.append(task)
        return {"label": task["label"], "seed": task["seed"]}, None

    monkeypatch.setattr(runner, "_text_run", fake_run)
    variants = {"micro": {}, "global": {"load_balance_scope": "global_batch", "bias_update_every": "step"}}
    res = run_text_arena(TEXT, ["topk_softmax", "sigmoid"], steps=1, model=TINY_LM, micro_batches=3,
                         variants=variants, progress=False)
    assert [t["label"] for t in seen] == ["topk_softmax micro", "topk_softmax global", "sigmoid micro",
                                          "sigmoid global"]
    base = TEXT_MOE.replace(d_model=16, n_experts=4, d_hidden=16)
    want = [gate_preset(g, len(res.vocab), base=base).replace(**v) for g in ("topk_softmax", "sigmoid")
            for v in variants.values()]
    assert [t["cfg"].moe for t in seen] == want
    assert all(t["micro_batches"] == 3 for t in seen)
    assert res.config["variants"] == variants and res.config["micro_batches"] == 3
    seen.clear()
    run_text_arena(TEXT, ["topk_softmax"], steps=1, model=TINY_LM, variants=variants, progress=False)
    assert [t["label"] for t in seen] == ["micro", "global"]


def test_bad_variants_and_micro_batches():
    for variants, match in [({}, "non-empty"), ({"a": {"nope": 1}}, "nope"), ({"a": {"gate": "hash"}}, "gate"),
                            ({"": {}}, "labels"), ({"a": 3}, "mapping")]:
        with pytest.raises(ValueError, match=match):
            run_text_arena(TEXT, ["topk_softmax"], steps=1, variants=variants, progress=False)
    with pytest.raises(ValueError, match="micro_batches"):
        run_text_arena(TEXT, ["topk_softmax"], steps=1, micro_batches=0, progress=False)


def test_accumulated_runs_report_balance_per_micro_batch_and_specialisation():
    res = run_text_arena(TEXT, ["topk_softmax"], steps=2, batch_size=2, micro_batches=2, eval_batches=3,
                         model=TINY_LM, variants={"micro": {}, "bias": {"load_balance_weight": 0.0,
                                                                        "bias_update_rate": 1e-2}}, progress=False)
    for run in res.runs:
        # The fullest expert over all batches holds at most the sum of each batch's fullest.
        assert run["micro_max_violation"] >= run["max_violation"] - 1e-9
        assert 0.0 <= run["char_expert_mi"] <= 2.0  # log2(4 experts)
    assert {r["label"] for r in leaderboard(res)} == {"micro", "bias"}
    assert "micro_max_violation" in leaderboard(res)[0]


def test_char_expert_mi_hand_computed():
    import torch

    from gatedmoe.analysis import RoutingStats
    from gatedmoe.arena.runner import _char_expert_mi
    from gatedmoe.routing import Routing

    def stats_of(experts_TK, ids):
        T, K = experts_TK.shape
        st = RoutingStats()
        st.update(Routing.from_topk(torch.full((T, K), 1.0 / K), experts_TK, 2), "l", torch.tensor(ids))
        return st

    # Character 0 always to expert 0, character 1 always to expert 1: the expert is the
    # character, 1 bit. Every token to both experts: the expert says nothing, 0 bits.
    assert _char_expert_mi(stats_of(torch.tensor([[0], [1], [0], [1]]), [0, 1, 0, 1])) == pytest.approx(1.0)
    assert _char_expert_mi(stats_of(torch.tensor([[0, 1], [0, 1]]), [0, 1])) == pytest.approx(0.0)
    # Character 0 -> expert 0 twice, character 1 -> experts 0 and 1: joint p = (1/2, 0; 1/4, 1/4),
    # I = H(expert) - H(expert | char) = H(3/4, 1/4) - 1/2 * 1 bit.
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert _char_expert_mi(stats_of(torch.tensor([[0], [0], [0], [1]]), [0, 0, 1, 1])) == pytest.approx(h - 0.5)
