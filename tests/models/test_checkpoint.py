"""Checkpoints of `train_lm` and `gatedmoe train --resume` (issue 23): integrity digest,
errors that name the file, refused conflicting flags, nothing-to-train, and a resumed run
that equals one run of the total length."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from gatedmoe.cli.main import main
from gatedmoe.models import load_checkpoint, train_lm

TEXT = "the quick brown fox jumps over the lazy dog. " * 40
KW = dict(batch_size=4, eval_every=2, eval_batches=1, progress=False)
CFG = dict(seq_len=16, d_model=16, n_layers=1, n_heads=2, n_experts=4, d_hidden=16)
TINY = ["--layers", "1", "--d-model", "16", "--d-hidden", "16", "--seq-len", "16", "--batch-size", "4",
        "--eval-every", "2", "--sample", "0", "--no-progress", "--experts", "4"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    train_lm(TEXT, steps=2, out_dir=out, **KW, **CFG)
    return out / "checkpoint"


@pytest.fixture
def copy(ckpt, tmp_path):
    dst = tmp_path / "checkpoint"
    shutil.copytree(ckpt, dst)
    return dst


def _flip(path, offset_from_end=100):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_digest_is_stored_and_verified(ckpt):
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert len(f.metadata()["gatedmoe.sha256"]) == 64
    model, _, _ = load_checkpoint(ckpt)
    assert model.cfg.moe.n_experts == 4


@pytest.mark.parametrize("name", ["model.safetensors", "train_state.safetensors"])
def test_flipped_bytes_fail_naming_the_file(copy, name):
    _flip(copy / name)
    with pytest.raises(ValueError, match=f"{name}.*corrupted"):
        train_lm(TEXT, steps=4, resume_from=copy, **KW)


@pytest.mark.parametrize("name", ["model.safetensors", "train_state.safetensors", "model.json", "train_state.json"])
def test_truncated_files_fail_naming_the_file(copy, name):
    path = copy / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=name):
        train_lm(TEXT, steps=4, resume_from=copy, **KW)


def test_missing_weights_fail_naming_the_file(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        load_checkpoint(copy)


def test_cli_eval_only_corrupted_is_one_line(copy, capsys, tmp_path):
    _flip(copy / "model.safetensors")
    with pytest.raises(SystemExit) as e:
        main(["train", "--eval-only", str(copy), "--out", str(tmp_path / "ev"), "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "model.safetensors" in err


def test_library_resume_refuses_another_model_or_lr(ckpt):
    with pytest.raises(ValueError, match=r"n_experts=8 \(checkpoint: 4\)"):
        train_lm(TEXT, steps=4, resume_from=ckpt, n_experts=8, **KW)
    with pytest.raises(ValueError, match=r"lr=0.5 \(checkpoint: 0.003\)"):
        train_lm(TEXT, steps=4, resume_from=ckpt, **{**KW, "lr": 0.5})
    with pytest.raises(ValueError, match="nothing to train.*step 2"):
        train_lm(TEXT, steps=2, resume_from=ckpt, **KW)


def test_library_precision_is_checked_and_kept_on_resume(ckpt, tmp_path):
    with pytest.raises(ValueError, match="precision must be one of float32, bf16, got 'fp16'"):
        train_lm(TEXT, steps=2, precision="fp16", **KW, **CFG)
    with pytest.raises(ValueError, match=r"precision='bf16' \(checkpoint: 'float32'\)"):
        train_lm(TEXT, steps=4, resume_from=ckpt, precision="bf16", **KW)
    out = tmp_path / "bf16"
    m = train_lm(TEXT, steps=2, out_dir=out, precision="bf16", **KW, **CFG)
    assert m["schedule"]["precision"] == "bf16" and all(map(math.isfinite, m["train_loss"]))
    resumed = train_lm(TEXT, steps=3, resume_from=out, **KW)
    assert resumed["schedule"]["precision"] == "bf16"


def test_cli_resume_refuses_conflicting_flags_and_says_nothing_to_train(tmp_path, capsys):
    data = tmp_path / "c.txt"
    data.write_text(TEXT)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--steps", "2", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(data), "--steps", "4", "--resume", str(run), "--out", str(run),
              "--experts", "8", "--gate", "switch", "--layers", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--experts 8 (checkpoint: 4)" in err and "--gate switch" in err and "--layers 3 (checkpoint: 1)" in err
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(data), "--steps", "2", "--resume", str(run), "--out", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "nothing to train" in err and "step 2" in err
    # The same flags as the checkpoint are fine.
    assert main(["train", "--data", str(data), "--steps", "3", "--resume", str(run), "--out", str(run), *TINY]) == 0


def test_cli_resume_10_then_14_equals_14(tmp_path):
    data = tmp_path / "c.txt"
    data.write_text(TEXT)
    tiny = [*TINY, "--eval-every", "100"]
    assert main(["train", "--data", str(data), "--steps", "14", "--out", str(tmp_path / "one"), *tiny]) == 0
    assert main(["train", "--data", str(data), "--steps", "10", "--out", str(tmp_path / "two"), *tiny]) == 0
    assert main(["train", "--data", str(data), "--steps", "14", "--resume", str(tmp_path / "two"),
                 "--out", str(tmp_path / "two"), *tiny]) == 0
    one = load_file(str(tmp_path / "one" / "checkpoint" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "checkpoint" / "model.safetensors"))
    for name in one:
        assert torch.equal(one[name], two[name]), name
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1["train_loss"] == m2["train_loss"] and m2["resumed_from_step"] == 10


def test_library_inverse_sqrt_resume_equals_one_run(tmp_path):
    one = train_lm(TEXT, steps=6, schedule="inverse_sqrt", **KW, **CFG)
    train_lm(TEXT, steps=4, schedule="inverse_sqrt", out_dir=tmp_path, **KW, **CFG)
    two = train_lm(TEXT, steps=6, resume_from=tmp_path, **KW)
    assert two["schedule"]["schedule"] == "inverse_sqrt"
    for (name, a), b in zip(one["model"].state_dict().items(), two["model"].state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_cli_precision_trains_bf16_and_resume_keeps_it(tmp_path, capsys):
    data = tmp_path / "c.txt"
    data.write_text(TEXT)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--steps", "2", "--out", str(run), "--precision", "bf16", *TINY]) == 0
    assert json.loads((run / "metrics.json").read_text())["schedule"]["precision"] == "bf16"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(data), "--steps", "4", "--resume", str(run), "--out", str(run),
              "--precision", "float32", "--no-progress"])
    assert e.value.code == 2 and "--precision float32 (checkpoint: bf16)" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--steps", "3", "--resume", str(run), "--out", str(run),
                 "--no-progress", "--sample", "0"]) == 0
    assert json.loads((run / "metrics.json").read_text())["schedule"]["precision"] == "bf16"


def test_evaluation_builds_no_graph(ckpt):
    from gatedmoe.models import TextBatches, evaluate_lm

    model, tok, _ = load_checkpoint(ckpt)
    seen = []
    model.register_forward_hook(lambda mod, args, out: seen.append(torch.is_grad_enabled()))
    for precision in ("float32", "bf16"):
        evaluate_lm(model, TextBatches(tok.encode(TEXT), model.cfg.seq_len), 2, 1, precision=precision)
    assert seen == [False, False]
