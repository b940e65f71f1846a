import json

import pytest
import torch

from gatedmoe.models import (
    CharTokenizer,
    LMConfig,
    MoETransformerLM,
    TextBatches,
    load_checkpoint,
    train_lm,
)


def test_tokenizer_round_trip_and_unknown_char():
    tok = CharTokenizer.from_text("hello world")
    assert tok.decode(tok.encode("low hello")) == "low hello"
    with pytest.raises(ValueError, match="vocabulary"):
        tok.encode("z")


def test_batches_shift_by_one():
    data = TextBatches(torch.arange(1000), seq_len=16)
    x, y = data.batch("train", 4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 16) and torch.equal(y, x + 1)
    assert int(data.val.min()) > int(data.train.max())


def test_lm_is_causal():
    lm = MoETransformerLM(LMConfig(vocab_size=11, seq_len=12, d_model=16, n_layers=2, n_heads=2, n_experts=4, d_hidden=16)).eval()
    idx = torch.randint(0, 11, (1, 12))
    idx2 = idx.clone()
    idx2[0, 8:] = (idx2[0, 8:] + 1) % 11
    # Capacity-free routing is per token, so earlier positions cannot see later ones.
    torch.testing.assert_close(lm(idx)[:, :8], lm(idx2)[:, :8])


def test_param_counts():
    cfg = LMConfig(vocab_size=11, seq_len=8, d_model=16, n_layers=2, n_heads=2, n_experts=4, k=1, d_hidden=8, moe_every=2)
    lm = MoETransformerLM(cfg)
    total, active = lm.n_params()
    per_expert = 2 * 8 * 16 + 8 * 16
    assert total - active == 3 * per_expert  # one MoE layer, 3 of 4 experts idle per token


def test_train_lm_learns_and_writes_outputs(tmp_path):
    text = "abcdefgh" * 200
    m = train_lm(text, steps=30, batch_size=8, lr=1e-2, eval_every=15, eval_batches=2, out_dir=tmp_path, progress=False,
                 seq_len=16, d_model=32, n_layers=1, n_heads=2, n_experts=4, d_hidden=16)
    # The sequence is deterministic: loss must fall far below log(8) = 2.08.
    assert m["final_val_loss"] < 1.0
    assert m["train_loss"][-1] < m["train_loss"][0]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["routing"]["layers"] and (tmp_path / "load.png").stat().st_size > 1000
    model, tok, meta = load_checkpoint(tmp_path / "checkpoint")
    assert meta["steps"] == 30 and tok.vocab_size == 8
    x = tok.encode("abcdefgh").view(1, -1)
    torch.testing.assert_close(model.eval()(x), m["model"].eval()(x))


def test_config_validation():
    with pytest.raises(ValueError, match="n_heads"):
        LMConfig(vocab_size=5, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="steps"):
        train_lm("abc" * 100, steps=0)
