import json

import pytest

from gatedmoe.cli.main import main


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "bench" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage" in capsys.readouterr().out


def test_bench_tiny_cpu(tmp_path, capsys):
    path = tmp_path / "b.json"
    rc = main(["bench", "--tokens", "64", "--d-model", "16", "--d-hidden", "32", "--experts", "4", "--k", "2",
               "--reps", "1", "--json", str(path)])
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
    rc = main(["bench", "--ep", "2", "--tokens", "64", "--d-model", "16", "--d-hidden", "32", "--experts", "4",
               "--k", "2", "--steps", "2", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "check vs one process: ok" in out and "all-to-all share" in out
    assert json.loads(path.read_text())["n_ranks"] == 2
