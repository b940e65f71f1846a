import json
import math

import pytest

from gatedmoe.cli.main import main


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "bench" in out


@pytest.mark.parametrize("command", ["train", "predict", "compare", "simulate", "fit", "bench"])
def test_subcommand_help_gives_every_option_its_default_and_an_example(command, capsys):
    """A new user reads ``gatedmoe CMD --help``: each option says what it does and, when it has a
    value by default, which; the help ends with commands to copy."""
    import argparse

    from gatedmoe.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[command]._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{command} {action.option_strings[-1]} has no help"
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in action.help, f"{command} {action.option_strings[-1]}: no default in {action.help!r}"
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    examples = out[out.index("examples:"):]
    assert f"gatedmoe {command} " in examples


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage" in capsys.readouterr().out


def test_bench_tiny_cpu(tmp_path, capsys):
    path = tmp_path / "b.json"
    rc = main(["bench", "--device", "cpu", "--tokens", "64", "--d-model", "16", "--d-hidden", "32", "--experts", "4",
               "--k", "2", "--reps", "1", "--json", str(path)])
    assert rc == 0
    rows = json.loads(path.read_text())["rows"]
    assert {r["backend"] for r in rows} == {"reference", "bare_grouped_mm", "grouped"}
    assert all(r["ms"] > 0 for r in rows)
    assert "ceiling" in capsys.readouterr().out


def test_bench_unknown_backend():
    with pytest.raises(SystemExit, match="unknown backend"):
        main(["bench", "--tokens", "8", "--backend", "cuda_magic"])


def test_train_tiny(tmp_path, capsys):
    rc = main(["train", "--steps", "3", "--layers", "1", "--d-model", "32", "--d-hidden", "16", "--seq-len", "16",
               "--batch-size", "4", "--eval-every", "3", "--sample", "20", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "sample:" in out
    assert (tmp_path / "checkpoint" / "model.safetensors").exists()


def test_bench_ep_two_ranks(tmp_path, capsys):
    path = tmp_path / "ep.json"
    rc = main(["bench", "--device", "cpu", "--ep", "2", "--tokens", "64", "--d-model", "16", "--d-hidden", "32", "--experts", "4",
               "--k", "2", "--steps", "2", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "check vs one process: ok" in out and "all-to-all share" in out
    assert json.loads(path.read_text())["n_ranks"] == 2


def test_compare_tiny_end_to_end(tmp_path, capsys):
    rc = main(["compare", "--gates", "topk_softmax,switch", "--steps", "3", "--layers", "1", "--d-model", "16",
               "--seq-len", "16", "--experts", "4", "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1",
               "--dataset", "wine", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "val loss" in out and "mlp (equal params)" in out and "report.html" in out
    for name in ("results.json", "results.csv", "report.html", "text_loss_curves.png", "tabular_loss_curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [t["task"] for t in doc["tasks"]] == ["text", "tabular"]


def test_compare_micro_batches(tmp_path, capsys):
    rc = main(["compare", "--task", "text", "--gates", "topk_softmax", "--steps", "2", "--layers", "1", "--d-model",
               "16", "--seq-len", "16", "--experts", "4", "--batch-size", "2", "--micro-batches", "2",
               "--eval-batches", "2", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0 and "max viol/micro" in capsys.readouterr().out
    task = json.loads((tmp_path / "results.json").read_text())["tasks"][0]
    assert task["config"]["micro_batches"] == 2 and "micro_max_violation" in task["runs"][0]


def test_compare_unknown_gate():
    with pytest.raises(SystemExit, match="unknown gate"):
        main(["compare", "--gates", "topk_softmax,bogus"])


TINY_TRAIN = ["--layers", "1", "--d-model", "16", "--d-hidden", "16", "--seq-len", "16", "--batch-size", "4",
              "--eval-every", "2", "--sample", "0", "--no-progress", "--experts", "4"]


def test_train_data_resume_and_eval_only(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("all the world's a stage, and all the men and women merely players. " * 20, encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--steps", "2", "--gated-attention", "--out", str(run), *TINY_TRAIN]) == 0
    assert json.loads((run / "checkpoint" / "model.json").read_text())["config"]["gated_attention"] is True
    assert main(["train", "--data", str(data), "--steps", "4", "--resume", str(run), "--out", str(run), *TINY_TRAIN]) == 0
    out = capsys.readouterr().out
    assert "resumed from step 2" in out and "after 4 steps" in out
    assert main(["train", "--data", str(data), "--eval-only", str(run), "--out", str(tmp_path / "ev"), *TINY_TRAIN]) == 0
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["val_loss"] > 0 and ev["routing"]["layers"]
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(["train", "--eval-only", str(tmp_path / "nothing")])


def test_train_micro_batches_reach_the_run_and_its_resume(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("to be, or not to be, that is the question. " * 20, encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--steps", "2", "--micro-batches", "3", "--out", str(run),
                 *TINY_TRAIN]) == 0
    assert json.loads((run / "metrics.json").read_text())["micro_batches"] == 3
    assert main(["train", "--data", str(data), "--steps", "3", "--resume", str(run), "--out", str(run),
                 *TINY_TRAIN]) == 0
    assert json.loads((run / "metrics.json").read_text())["micro_batches"] == 3  # the checkpoint's
    with pytest.raises(SystemExit, match="micro-batches"):
        main(["train", "--micro-batches", "0"])


def test_train_csv_trains_tabular_moe(tmp_path, capsys):
    csv_path = tmp_path / "t.csv"
    rows = ["a,b,label"] + [f"{i % 7},{(i * 3) % 5},{'x' if i % 2 else 'y'}" for i in range(60)]
    csv_path.write_text("\n".join(rows) + "\n")
    rc = main(["train", "--data", str(csv_path), "--steps", "3", "--eval-every", "3", "--experts", "4",
               "--no-progress", "--out", str(tmp_path / "tab")])
    assert rc == 0
    assert "accuracy" in capsys.readouterr().out
    assert (tmp_path / "tab" / "metrics.json").exists() and (tmp_path / "tab" / "load.png").stat().st_size > 1000
    # The model it wrote predicts the rows again: one output row per input row, probabilities
    # that sum to 1, and the accuracy over the whole file printed since it has the target.
    rc = main(["predict", str(tmp_path / "tab"), str(csv_path), "--out", str(tmp_path / "p.csv")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "60 rows, classification of 'label'" in out and "accuracy" in out
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "prediction,p(x),p(y)" and len(lines) == 61
    for line in lines[1:]:
        label, *probs = line.split(",")
        assert label in ("x", "y") and abs(sum(map(float, probs)) - 1) < 1e-5
        assert label == ("x", "y")[max(range(2), key=lambda i: float(probs[i]))]


def test_predict_regression_without_target_column(tmp_path, capsys):
    csv_path = tmp_path / "r.csv"
    csv_path.write_text("u,v,y\n" + "".join(f"{i % 9},{i % 4},{10 * (i % 9) + 3.5}\n" for i in range(80)))
    assert main(["train", "--data", str(csv_path), "--steps", "30", "--experts", "4", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 0
    new = tmp_path / "new.csv"
    new.write_text("v,u\n1,2\n3,8\n")
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run" / "model"), str(new), "--out", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr().out
    assert "2 rows, regression of 'y'" in out and "RMSE" not in out
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "prediction" and len(lines) == 3 and all(math.isfinite(float(v)) for v in lines[1:])
    # In the target's units, not the standardized ones the model works in (standard deviation
    # 26): within one deviation of y = 10 u + 3.5 at u = 2 and 8 (23.5, 83.5), far from
    # standardized values near 0.
    assert all(abs(float(v) - want) < 26 for v, want in zip(lines[1:], (23.5, 83.5), strict=True)), lines


def test_bench_layer_tiny_cpu(tmp_path):
    path = tmp_path / "l.json"
    rc = main(["bench", "--device", "cpu", "--layer", "--tokens", "32", "--d-model", "16", "--d-hidden", "16", "--experts", "4",
               "--reps", "1", "--backend", "grouped", "--json", str(path)])
    assert rc == 0
    rows = json.loads(path.read_text())["rows"]
    assert [r["pass"] for r in rows] == ["fwd", "fwd+bwd"] and rows[0]["routing"] == "gate:topk_softmax"


def test_train_flags_make_one_moe_config():
    from gatedmoe.cli.main import build_parser
    from gatedmoe.cli.train import _moe_config
    from gatedmoe.models import LMConfig, TabularMoE

    args = build_parser().parse_args(["train", "--gate", "sigmoid", "--experts", "4", "--k", "1", "--d-hidden", "16",
                                      "--capacity-factor", "1.5", "--shared-experts", "1"])
    flags = dict(gate="sigmoid", n_experts=4, k=1, d_hidden=16, capacity_factor=1.5, n_shared_experts=1)
    assert _moe_config(args, LMConfig.default_moe) == LMConfig.default_moe.replace(**flags)
    assert _moe_config(args, TabularMoE.default_moe) == TabularMoE.default_moe.replace(**flags)
    args = build_parser().parse_args(["train", "--d-model", "32"])
    assert _moe_config(args, TabularMoE.default_moe).d_model == 32


def test_simulate_every_fit_failed_still_writes_its_outputs(tmp_path, capsys):
    """5 experts fitted to 10-20 samples: every fit fails; the table says so and the figure is
    written (matplotlib refused to log-scale an empty loss axis: 'Data cannot be log-scaled')."""
    out = tmp_path / "sim"
    assert main(["simulate", "--n-min", "10", "--n-max", "20", "--n-points", "2", "--reps", "1", "--fit-experts", "5",
                 "--no-progress", "--out", str(out)]) == 0
    assert "100%" in capsys.readouterr().out
    assert (out / "simulate.csv").exists() and (out / "simulate.png").stat().st_size > 0
