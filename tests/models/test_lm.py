import json

import pytest
import torch

from gatedmoe.models import (
    CharTokenizer,
    LMConfig,
    MoETransformerLM,
    TextBatches,
    load_checkpoint,
    save_checkpoint,
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


def _tiny_cfg(**kw):
    base = dict(vocab_size=11, seq_len=12, d_model=16, n_layers=2, n_heads=2, n_experts=4, d_hidden=16)
    return LMConfig(**{**base, **kw})


def test_gated_attention_formula_and_causality():
    from gatedmoe.models.transformer import CausalSelfAttention

    plain = CausalSelfAttention(_tiny_cfg())
    gated = CausalSelfAttention(_tiny_cfg(gated_attention=True))
    gated.qkv.load_state_dict(plain.qkv.state_dict())
    gated.proj.load_state_dict(plain.proj.state_dict())
    x = torch.randn(2, 12, 16)
    # W_g = 0: sigmoid(0) = 1/2 on every channel, so the output is half the ungated one.
    torch.nn.init.zeros_(gated.gate.weight)
    torch.testing.assert_close(gated(x), 0.5 * plain(x))
    # General W_g: Y' = Y * sigmoid(X W_g) before the output projection, checked in float64.
    torch.nn.init.normal_(gated.gate.weight)
    g64 = gated.double()
    x64 = x.double()
    B, S, D = x64.shape
    q, k, v = g64.qkv(x64).view(B, S, 3, 2, D // 2).unbind(2)
    y = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         is_causal=True).transpose(1, 2).reshape(B, S, D)
    torch.testing.assert_close(g64(x64), g64.proj(y * torch.sigmoid(x64 @ g64.gate.weight.T)))
    lm = MoETransformerLM(_tiny_cfg(gated_attention=True)).eval()
    idx = torch.randint(0, 11, (1, 12))
    idx2 = idx.clone()
    idx2[0, 8:] = (idx2[0, 8:] + 1) % 11
    torch.testing.assert_close(lm(idx)[:, :8], lm(idx2)[:, :8])
    assert lm.n_params()[0] - MoETransformerLM(_tiny_cfg()).n_params()[0] == 2 * 16 * 16


def test_hash_gate_routes_by_input_token_and_measured_active_params():
    from gatedmoe.analysis import RoutingStats

    lm = MoETransformerLM(_tiny_cfg(gate="hash", gate_kwargs={"vocab_size": 11}))
    idx = torch.randint(0, 11, (2, 12))
    lm(idx)
    for moe in lm.moe_layers():
        r = moe.last_routing
        torch.testing.assert_close(r.expert[torch.argsort(r.token)], moe.gate.table[idx.reshape(-1)])
    stats = RoutingStats()
    stats.update_model(lm, token_ids=idx)
    per_token = {k: v["experts_per_token"] for k, v in stats.summary()["layers"].items()}
    assert per_token == {"blocks.0.ffn": 1.0, "blocks.1.ffn": 1.0}
    total, active = lm.n_params(per_token)
    per_expert = 2 * 16 * 16 + 16 * 16
    assert total - active == 2 * 3 * per_expert


def test_resume_continues_exactly(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 40
    kw = dict(batch_size=4, lr=1e-2, eval_every=3, eval_batches=1, progress=False)
    cfg = dict(seq_len=16, d_model=16, n_layers=1, n_heads=2, n_experts=4, d_hidden=16, gate="sigmoid",
               gate_kwargs={"bias_update_rate": 1e-2})
    straight = train_lm(text, steps=6, out_dir=tmp_path / "a", **kw, **cfg)
    train_lm(text, steps=3, schedule_steps=6, out_dir=tmp_path / "b", **kw, **cfg)
    resumed = train_lm(text, steps=6, out_dir=tmp_path / "b", resume_from=tmp_path / "b", **kw)
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 6
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-5)
    for (name, a), b in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ValueError, match="vocabulary"):
        train_lm("xyz" * 200, steps=7, resume_from=tmp_path / "b", **kw)


def test_blocks_carry_the_moe_config_whole():
    from gatedmoe import MoEConfig

    moe = MoEConfig(d_model=16, n_experts=4, d_hidden=8, gate="sigmoid", k=1, capacity_factor=1.5,
                    bias_update_rate=1e-2, check_inputs=False)
    cfg = LMConfig(vocab_size=11, seq_len=8, n_layers=4, n_heads=2, moe=moe, moe_every=2)
    assert cfg.d_model == 16  # taken from moe
    lm = MoETransformerLM(cfg)
    assert [type(b.ffn).__name__ for b in lm.blocks] == ["DenseFFN", "MoE", "DenseFFN", "MoE"]
    assert all(b.ffn.config == cfg.moe for b in lm.blocks[1::2])
    # The dense blocks have the MoE's active width k * d_hidden.
    assert lm.blocks[0].ffn.w_out.in_features == 1 * 8
    assert lm(torch.randint(0, 11, (2, 8))).shape == (2, 8, 11)


def test_flat_keywords_build_the_same_moe_config():
    flat = _tiny_cfg(k=1, gate="hash", gate_kwargs={"vocab_size": 11}, capacity_factor=2.0)
    nested = LMConfig(vocab_size=11, seq_len=12, n_layers=2, n_heads=2,
                      moe=LMConfig.default_moe.replace(d_model=16, n_experts=4, d_hidden=16, k=1, gate="hash",
                                                       gate_kwargs={"vocab_size": 11}, capacity_factor=2.0))
    assert flat == nested and flat.moe.check_inputs is False
    assert MoETransformerLM(flat).blocks[0].ffn.config == flat.moe
    assert LMConfig(vocab_size=5).moe == LMConfig.default_moe


def test_config_refuses_a_moe_that_disagrees():
    from gatedmoe import MoEConfig

    moe = MoEConfig(d_model=16, n_experts=4, d_hidden=8)
    with pytest.raises(ValueError, match="d_model=32"):
        LMConfig(vocab_size=5, d_model=32, n_heads=2, moe=moe)
    with pytest.raises(ValueError, match="not both"):
        LMConfig(vocab_size=5, n_heads=2, moe=moe, n_experts=8)
    with pytest.raises(TypeError, match="MoEConfig"):
        LMConfig(vocab_size=5, n_heads=2, moe=moe.to_dict())
    with pytest.raises(TypeError, match="n_expert"):
        LMConfig(vocab_size=5, n_expert=8)
    with pytest.raises(ValueError, match="n_experts"):
        LMConfig(vocab_size=5, n_experts=0)


# What LMConfig.to_dict() wrote before the MoE settings moved into `moe` (the flat form).
OLD_FLAT_MOE_KEYS = ("n_experts", "k", "d_hidden", "gate", "n_shared_experts", "capacity_factor", "activation",
                     "backend", "gate_kwargs")


def _old_format(cfg: LMConfig) -> dict:
    d = {k: v for k, v in cfg.to_dict().items() if k != "moe"}
    return {**d, **{k: cfg.to_dict()["moe"][k] for k in OLD_FLAT_MOE_KEYS}}


def test_from_dict_reads_old_flat_and_new_nested_dicts():
    from gatedmoe import MoEConfig, TritonOptions

    old = {"vocab_size": 11, "seq_len": 12, "d_model": 16, "n_layers": 2, "n_heads": 2, "n_experts": 4, "k": 1,
           "d_hidden": 16, "gate": "hash", "moe_every": 1, "n_shared_experts": 1, "capacity_factor": 2.0,
           "activation": "gelu", "backend": "auto", "dropout": 0.0, "gated_attention": False,
           "gate_kwargs": {"vocab_size": 11}}
    cfg = LMConfig.from_dict(json.loads(json.dumps(old)))
    assert cfg.moe == MoEConfig(d_model=16, n_experts=4, d_hidden=16, gate="hash", k=1, n_shared_experts=1,
                                capacity_factor=2.0, activation="gelu", gate_kwargs={"vocab_size": 11},
                                check_inputs=False)
    assert _old_format(cfg) == old
    assert LMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with_options = cfg.replace(moe=cfg.moe.replace(backend="triton", backend_options=TritonOptions(fp32_scatter=True)))
    assert LMConfig.from_dict(json.loads(json.dumps(with_options.to_dict()))) == with_options


def test_checkpoint_keeps_every_backend_option(tmp_path):
    """FP8 recipes and kernel configs are dataclasses inside the options: written as plain
    JSON and rebuilt on load (a checkpoint of an FP8 run used to fail to load: 'fp8 must be
    an FP8Recipe or None, got dict'; one with kernel configs failed to save)."""
    from gatedmoe import FP8Recipe, MoEConfig, TritonOptions
    from gatedmoe.dispatch.triton.config import KernelConfig

    options = TritonOptions(fp32_scatter=True, decode=False, fp8=FP8Recipe(scaling="blockwise", grad_format="e5m2"),
                            configs={"glu_fwd": KernelConfig(64, 64, 32, 4, 2), "fp8_gemm": KernelConfig(128, 64, 64, 8, 3)})
    cfg = LMConfig(vocab_size=10, d_model=16, n_layers=1, n_heads=2)
    cfg = cfg.replace(moe=cfg.moe.replace(backend="triton", backend_options=options))
    save_checkpoint(tmp_path, MoETransformerLM(cfg), CharTokenizer(list("abcdefghij")))
    loaded, _, _ = load_checkpoint(tmp_path)
    assert loaded.cfg == cfg and loaded.cfg.moe.backend_options == options
    assert TritonOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options
    assert MoEConfig.from_dict(cfg.moe.to_dict()) == MoEConfig.from_dict(cfg.moe.to_dict(plain=True)) == cfg.moe


def test_old_format_checkpoint_loads_and_resumes(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 40
    kw = dict(batch_size=4, lr=1e-2, eval_every=2, eval_batches=1, progress=False)
    cfg = dict(seq_len=16, d_model=16, n_layers=1, n_heads=2, n_experts=4, d_hidden=16, k=1)
    straight = train_lm(text, steps=4, **kw, **cfg)
    first = train_lm(text, steps=2, schedule_steps=4, out_dir=tmp_path, **kw, **cfg)
    meta_path = tmp_path / "checkpoint" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["config"] = _old_format(first["model"].cfg)
    assert "moe" not in meta["config"] and meta["config"]["n_experts"] == 4
    meta_path.write_text(json.dumps(meta))
    model, _, _ = load_checkpoint(tmp_path / "checkpoint")
    assert model.cfg == first["model"].cfg
    resumed = train_lm(text, steps=4, resume_from=tmp_path, **kw)
    assert resumed["resumed_from_step"] == 2 and resumed["model"].cfg == straight["model"].cfg
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-5)


def test_gradient_accumulation_matches_one_batch_of_all_micro_batches():
    # Without the balance loss (a product of two batch means, not a mean over tokens) the
    # loss is a mean over tokens, so 2 micro-batches of 2 sequences take the step that one
    # batch of the same 4 sequences takes (the generator draws the same windows either way).
    text = "the quick brown fox jumps over the lazy dog. " * 40
    kw = dict(steps=3, lr=1e-2, eval_every=3, eval_batches=1, progress=False, seq_len=16, d_model=16, n_layers=1,
              n_heads=2, n_experts=4, d_hidden=16, load_balance_weight=0.0)
    one = train_lm(text, batch_size=4, **kw)
    acc = train_lm(text, batch_size=2, micro_batches=2, **kw)
    assert acc["micro_batches"] == 2 and one["micro_batches"] == 1
    assert acc["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    for (name, a), b in zip(one["model"].state_dict().items(), acc["model"].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)  # float32, other summation order
    with pytest.raises(ValueError, match="micro_batches"):
        train_lm(text, micro_batches=0, **kw)


@pytest.mark.parametrize("every", ["forward", "step"])
def test_gradient_accumulation_bias_steps_per_forward_or_per_step(every):
    # One optimizer step of 3 micro-batches: "step" moves each bias once (by -u, 0 or +u),
    # "forward" three times (u too small to change the routing, so an expert overloaded in
    # one micro-batch is overloaded in all three and moves by 3u).
    u = 1e-4
    m = train_lm("the quick brown fox jumps over the lazy dog. " * 40, steps=1, batch_size=2, micro_batches=3,
                 eval_batches=1, progress=False, seq_len=16, d_model=16, n_layers=1, n_heads=2, n_experts=4,
                 d_hidden=16, load_balance_weight=0.0, bias_update_rate=u, bias_update_every=every)
    moves = (m["model"].blocks[0].ffn.gate.balancer.bias / u).abs().round()
    assert moves.max() == (1 if every == "step" else 3)
