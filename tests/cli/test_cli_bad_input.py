"""Bad input to every `gatedmoe` subcommand (issue 23): each case must end before any work
as one line on stderr naming the flag, file or line, with exit status 2, never a traceback
and never a silent success. Every case is cheap: it must fail in the checks up front."""

import gzip

import pytest
import torch

from gatedmoe.cli.main import main

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


@pytest.fixture
def files(tmp_path):
    """Paths the cases use: a file where a folder is expected, texts and CSVs."""
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("a file, not a folder")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abcde")
    short_row = tmp_path / "short.csv"
    short_row.write_text("a,b,y\n1,2,3\n4,5,6\n7,8\n9,10,11\n")
    words = tmp_path / "words.csv"
    words.write_text("a,b,y\n1,2,3\n4,five,6\n7,8,9\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    return {"tmp": tmp_path, "blocker": blocker, "latin": latin, "tiny": tiny, "short": short_row, "words": words,
            "empty": empty, "unwritable": blocker / "out"}


def _fails(argv, capsys, *needles):
    """Run ``gatedmoe argv``: exit status 2, exactly one line on stderr containing every needle."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


TRAIN_CASES = [
    ("batch_size_0", ["--batch-size", "0"], ["--batch-size", ">= 1"]),
    ("eval_every_0", ["--eval-every", "0"], ["--eval-every"]),
    ("steps_0", ["--steps", "0"], ["--steps"]),
    ("steps_negative", ["--steps", "-3"], ["--steps"]),
    ("steps_not_a_number", ["--steps", "ten"], ["--steps", "'ten'"]),
    ("lr_nan", ["--lr", "nan"], ["--lr"]),
    ("lr_zero", ["--lr", "0"], ["--lr"]),
    ("experts_0", ["--experts", "0"], ["--experts"]),
    ("k_0", ["--k", "0"], ["--k"]),
    ("seq_len_word", ["--seq-len", "abc"], ["--seq-len"]),
    ("unknown_gate", ["--gate", "bogus"], ["unknown gate", "bogus"]),
    ("device_banana", ["--device", "banana"], ["--device", "banana"]),
    ("sample_negative", ["--sample", "-1"], ["--sample"]),
    ("schedule_steps_without_cosine", ["--schedule-steps", "5"], ["--schedule-steps", "cosine"]),
    # Flags the library would refuse naming its own arguments (k, n_experts, d_model, n_heads).
    ("k_above_experts", ["--k", "9", "--experts", "4"], ["--k 9", "--experts 4"]),
    ("k_above_default_experts", ["--k", "9"], ["--k 9", "--experts 8 (the default)"]),
    ("d_model_not_a_multiple_of_the_heads", ["--d-model", "30"], ["--d-model 30", "4 attention heads"]),
]


@pytest.mark.parametrize("flags,needles", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_refuses_bad_flags(flags, needles, capsys, tmp_path):
    _fails(["train", "--out", tmp_path / "o", "--no-progress", *flags], capsys, *needles)


@NO_CUDA
@pytest.mark.parametrize("command", ["train", "compare", "bench"])
def test_cuda_without_cuda(command, capsys, tmp_path):
    extra = ["--out", tmp_path / "o"] if command != "bench" else []
    _fails([command, "--device", "cuda", *extra], capsys, "--device cuda", "no CUDA")


def test_train_unwritable_out_before_training(files, capsys, monkeypatch):
    import gatedmoe.models as models

    monkeypatch.setattr(models, "train_lm", lambda *a, **k: pytest.fail("trained before checking --out"))
    _fails(["train", "--out", files["unwritable"]], capsys, "--out", "cannot be written")
    _fails(["train", "--out", files["blocker"]], capsys, "--out", "is a file")


@pytest.mark.parametrize("case,needles", [
    ("missing", ["--data", "does not exist"]),
    ("latin", ["--data", "not UTF-8"]),
    ("tiny", ["--data", "at least 100 characters"]),
    ("short", ["short.csv, line 4", "2 cells", "3"]),
])
def test_train_bad_data(case, needles, files, capsys):
    path = files["tmp"] / "nope.txt" if case == "missing" else files[case]
    _fails(["train", "--data", path, "--out", files["tmp"] / "o", "--no-progress"], capsys, *needles)


def test_predict_bad_input(files, capsys):
    """A missing model or data file, a text model, an output path that is a folder, an unknown
    label: one line each, naming what is wrong."""
    tmp = files["tmp"]
    good = tmp / "good.csv"
    good.write_text("a,color,y\n" + "".join(f"{i % 5},{'red' if i % 3 else 'blue'},{i % 2}\n" for i in range(40)))
    assert main(["train", "--data", str(good), "--steps", "2", "--experts", "2", "--no-progress",
                 "--out", str(tmp / "run")]) == 0
    capsys.readouterr()
    _fails(["predict", tmp / "none", good], capsys, "no checkpoint")
    _fails(["predict", tmp / "run", tmp / "none.csv"], capsys, "data", "does not exist")
    _fails(["predict", tmp / "run", good, "--out", tmp], capsys, "--out", "is a folder")
    _fails(["predict", tmp / "run", good, "--out", good], capsys, "--out", "is the input file")
    purple = tmp / "purple.csv"
    purple.write_text("a,color\n1,red\n2,purple\n")
    _fails(["predict", tmp / "run", purple, "--out", tmp / "p.csv"], capsys, "purple.csv, line 3", "'color'", "'purple'")
    from gatedmoe.models import CharTokenizer, LMConfig, MoETransformerLM, save_checkpoint

    lm = tmp / "lm"
    save_checkpoint(lm, MoETransformerLM(LMConfig(vocab_size=4, d_model=8, n_layers=1, n_heads=2)), CharTokenizer(list("abcd")))
    _fails(["predict", lm, good], capsys, "text model", "--eval-only")
    (tmp / "lmrun").mkdir()
    lm.rename(tmp / "lmrun" / "checkpoint")
    _fails(["predict", tmp / "lmrun", good], capsys, "text model's run", "--eval-only")
    _fails(["train", "--eval-only", tmp / "run", "--out", tmp / "o"], capsys, "TabularMoE's", "gatedmoe predict")
    _fails(["train", "--resume", tmp / "run", "--out", tmp / "o"], capsys, "TabularMoE's", "gatedmoe predict")


def test_train_resume_and_eval_only_missing_checkpoint(files, capsys):
    _fails(["train", "--resume", files["tmp"] / "none", "--out", files["tmp"] / "o"], capsys, "no checkpoint")
    _fails(["train", "--eval-only", files["tmp"] / "none", "--out", files["tmp"] / "o"], capsys, "no checkpoint")


COMPARE_CASES = [
    ("steps_0", ["--steps", "0"], ["--steps"]),
    ("seeds_0", ["--seeds", "0"], ["--seeds"]),
    ("jobs_0", ["--jobs", "0"], ["--jobs"]),
    ("threads_0", ["--threads", "0"], ["--threads"]),
    ("eval_every_0", ["--eval-every", "0"], ["--eval-every"]),
    ("eval_batches_0", ["--eval-batches", "0"], ["--eval-batches"]),
    ("batch_size_0", ["--batch-size", "0"], ["--batch-size"]),
    ("lr_inf", ["--lr", "inf"], ["--lr"]),
    ("gates_empty", ["--gates", ","], ["--gates is empty"]),
    ("gates_unknown", ["--gates", "topk_softmax,bogus"], ["unknown gate"]),
    ("task_unknown", ["--task", "images"], ["--task"]),
    ("d_model_not_a_multiple_of_the_heads", ["--task", "text", "--d-model", "30"], ["--d-model 30", "attention heads"]),
    ("experts_below_the_presets_k", ["--task", "tabular", "--experts", "1"], ["--experts 1", "experts per token"]),
]


@pytest.mark.parametrize("flags,needles", [c[1:] for c in COMPARE_CASES], ids=[c[0] for c in COMPARE_CASES])
def test_compare_refuses_bad_flags(flags, needles, capsys, tmp_path):
    _fails(["compare", "--out", tmp_path / "o", "--no-progress", *flags], capsys, *needles)


def test_compare_files_and_out(files, capsys, monkeypatch):
    import gatedmoe.arena as arena

    monkeypatch.setattr(arena, "run_text_arena", lambda *a, **k: pytest.fail("trained before checking the inputs"))
    _fails(["compare", "--out", files["unwritable"]], capsys, "--out", "cannot be written")
    _fails(["compare", "--text", files["tmp"] / "none.txt", "--out", files["tmp"] / "o"], capsys, "--text", "does not exist")
    _fails(["compare", "--task", "tabular", "--dataset", files["tmp"] / "none.csv", "--out", files["tmp"] / "o"], capsys,
           "--dataset", "does not exist")


def test_compare_short_csv_row_names_file_and_line(files, capsys):
    _fails(["compare", "--task", "tabular", "--dataset", files["short"], "--out", files["tmp"] / "o", "--no-progress"],
           capsys, "short.csv, line 4")


def test_compare_only_token_id_gates_on_a_table(files, capsys):
    _fails(["compare", "--task", "tabular", "--gates", "hash", "--dataset", "wine", "--out", files["tmp"] / "o",
            "--no-progress"], capsys, "gates")


BENCH_CASES = [
    ("tokens_0", ["--tokens", "0"], ["--tokens"]),
    ("reps_0", ["--reps", "0"], ["--reps"]),
    ("ep_negative", ["--ep", "-1"], ["--ep"]),
    ("shape_unknown", ["--device", "cpu", "--shape", "huge"], ["unknown --shape"]),
    ("backend_unknown", ["--device", "cpu", "--tokens", "8", "--backend", "magic"], ["unknown backend"]),
    ("gpu_shape_on_cpu", ["--device", "cpu", "--shape", "gpu"], ["--shape gpu", "GPU preset"]),
    ("gpu_preset_on_cpu", ["--device", "cpu", "--shape", "mixtral"], ["--shape mixtral", "GPU preset"]),
    ("memory_fraction_negative", ["--device", "cpu", "--max-memory-fraction", "-1"], ["argument --max-memory-fraction", "> 0"]),
    ("memory_fraction_nan", ["--device", "cpu", "--max-memory-fraction", "nan"], ["argument --max-memory-fraction", "> 0"]),
    ("layer_reference", ["--device", "cpu", "--tokens", "8", "--layer", "--backend", "reference"],
     ["--layer", "reference"]),
    ("too_big_for_memory", ["--device", "cpu", "--tokens", "100000000", "--d-hidden", "100000"], ["GiB", "free"]),
    ("k_above_experts", ["--device", "cpu", "--tokens", "8", "--experts", "4", "--k", "9"], ["--k 9", "--experts 4"]),
    ("k_above_the_shapes_experts", ["--device", "cpu", "--tokens", "8", "--k", "9"], ["--k 9", "--experts 8 (of --shape cpu)"]),
    ("ep_does_not_divide_experts", ["--device", "cpu", "--ep", "3"], ["--experts 8", "--ep 3"]),
]


@pytest.mark.parametrize("flags,needles", [c[1:] for c in BENCH_CASES], ids=[c[0] for c in BENCH_CASES])
def test_bench_refuses_before_allocating(flags, needles, capsys, monkeypatch):
    import gatedmoe.bench as bench

    monkeypatch.setattr(bench, "dense_ceiling", lambda *a, **k: pytest.fail("measured before checking"))
    _fails(["bench", *flags], capsys, *needles)


def test_bench_triton_on_cpu(capsys, monkeypatch):
    """Without CUDA (nor the interpreter) the triton backend falls back to grouped: refused, rather
    than rows that time grouped under triton's name."""
    import gatedmoe.bench as bench

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(bench, "dense_ceiling", lambda *a, **k: pytest.fail("measured before checking"))
    _fails(["bench", "--device", "cpu", "--tokens", "8", "--backend", "grouped,triton"], capsys,
           "--backend triton", "CUDA")


def test_bench_json_unwritable(files, capsys):
    _fails(["bench", "--device", "cpu", "--tokens", "8", "--json", files["unwritable"] / "b.json"], capsys,
           "--json", "cannot be written")


def test_bench_memory_estimate_is_the_order_of_the_issue():
    from gatedmoe.bench import SHAPES, estimate_memory_bytes

    # Issue 23: --shape gpu on a CPU was killed at 18-20 GB, in the Mixtral shape.
    gib = estimate_memory_bytes(SHAPES["mixtral"], torch.float32) / 2**30
    assert 12 < gib < 40


FIT_CASES = [
    ("missing_file", lambda f: [f["tmp"] / "none.csv", "--target", "y"], ["does not exist"]),
    ("short_row", lambda f: [f["short"], "--target", "y"], ["short.csv, line 4", "2 cells"]),
    ("word_in_features", lambda f: [f["words"], "--target", "y"], ["words.csv, line 3", "numeric"]),
    ("unknown_target", lambda f: [f["short"], "--target", "z"], ["--target 'z'"]),
    ("empty_file", lambda f: [f["empty"], "--target", "y"], ["header row"]),
    ("experts_0", lambda f: [f["short"], "--target", "y", "--experts", "0"], ["--experts"]),
    ("tol_negative", lambda f: [f["short"], "--target", "y", "--tol", "-1"], ["--tol"]),
    ("max_iter_0", lambda f: [f["short"], "--target", "y", "--max-iter", "0"], ["--max-iter"]),
    ("topk_without_k", lambda f: [f["words"], "--target", "y", "--gate", "topk_softmax"], ["--gate topk_softmax"]),
    ("seed_negative", lambda f: [f["words"], "--target", "y", "--seed", "-1"], ["--seed", ">= 0"]),
    ("k_above_experts", lambda f: [f["words"], "--target", "y", "--experts", "3", "--gate", "topk_softmax", "--k", "5"],
     ["--k", "--experts 3"]),
]


@pytest.mark.parametrize("argv,needles", [c[1:] for c in FIT_CASES], ids=[c[0] for c in FIT_CASES])
def test_fit_bad_input(argv, needles, files, capsys):
    _fails(["fit", *argv(files)], capsys, *needles)


SIMULATE_CASES = [
    ("n_min_1", ["--n-min", "1"], ["--n-min"]),
    ("n_max_below_min", ["--n-min", "100", "--n-max", "50"], ["--n-max"]),
    ("reps_0", ["--reps", "0"], ["--reps"]),
    ("experts_0", ["--experts", "0"], ["--experts"]),
    ("topk_without_k", ["--gate", "topk_softmax"], ["--gate topk_softmax"]),
    ("seed_negative", ["--seed", "-1"], ["--seed", ">= 0"]),
    ("fit_experts_below_experts", ["--experts", "3", "--fit-experts", "2"], ["--fit-experts 2", "--experts 3"]),
    ("fit_experts_far_above_experts", ["--experts", "3", "--fit-experts", "9"], ["--fit-experts 9", "--experts 3"]),
    ("n_min_below_fit_experts", ["--experts", "3", "--n-min", "2"], ["--n-min 2", "3 experts"]),
    ("k_above_experts", ["--experts", "3", "--gate", "topk_softmax", "--k", "4"], ["--k", "--experts 3"]),
]


@pytest.mark.parametrize("flags,needles", [c[1:] for c in SIMULATE_CASES], ids=[c[0] for c in SIMULATE_CASES])
def test_simulate_bad_input(flags, needles, capsys, tmp_path):
    _fails(["simulate", "--out", tmp_path / "o", "--no-progress", *flags], capsys, *needles)


def test_simulate_unwritable_out(files, capsys):
    _fails(["simulate", "--out", files["unwritable"], "--n-min", "10", "--n-max", "20", "--n-points", "1", "--reps", "1",
            "--no-progress"], capsys, "--out", "cannot be written")


def test_unknown_command_and_flag(capsys):
    _fails(["frobnicate"], capsys, "invalid choice")
    _fails(["train", "--no-such-flag"], capsys, "--no-such-flag")


def test_gzip_is_not_text(files, capsys):
    path = files["tmp"] / "corpus.txt.gz"
    path.write_bytes(gzip.compress(b"to be or not to be " * 50))
    _fails(["train", "--data", path, "--out", files["tmp"] / "o"], capsys, "--data", "not UTF-8")


@pytest.mark.parametrize("flags,needle", [
    (["--seq-len", "7"], "--seq-len"),
    (["--layers", "3"], "--layers"),
    (["--sample", "5"], "--sample"),
    (["--micro-batches", "2"], "--micro-batches"),
    (["--lr-schedule", "cosine"], "--lr-schedule"),
    (["--gated-attention"], "--gated-attention"),
    (["--precision", "bf16"], "--precision"),
])
def test_train_csv_refuses_text_model_flags(flags, needle, files, capsys, monkeypatch):
    """A CSV --data trains a TabularMoE, which has no layers, context, sampling or schedule: a
    text-model flag given with it is refused, not silently ignored."""
    import gatedmoe.models as models

    monkeypatch.setattr(models, "train_tabular", lambda *a, **k: pytest.fail("trained, ignoring " + needle))
    _fails(["train", "--data", files["words"], "--out", files["tmp"] / "o", "--no-progress", *flags], capsys,
           needle, "CSV")


def test_train_text_refuses_target(files, capsys, monkeypatch):
    import gatedmoe.models as models

    monkeypatch.setattr(models, "train_lm", lambda *a, **k: pytest.fail("trained, ignoring --target"))
    text = files["tmp"] / "text.txt"
    text.write_text("to be or not to be " * 20)
    _fails(["train", "--data", text, "--target", "y", "--out", files["tmp"] / "o"], capsys, "--target", "CSV")
    _fails(["train", "--target", "y", "--out", files["tmp"] / "o"], capsys, "--target", "CSV")


def test_train_csv_refuses_a_gpu_device(files, capsys, monkeypatch):
    """train_tabular trains on the CPU: a CSV run with --device cuda would quietly not use the GPU."""
    import gatedmoe.cli.train as train

    monkeypatch.setattr(train, "check_device", lambda spec, flag="--device": torch.device(spec))
    _fails(["train", "--data", files["words"], "--device", "cuda", "--out", files["tmp"] / "o"], capsys,
           "--device cuda", "cpu")


@pytest.mark.parametrize("case,flags,needles", [
    ("target_with_builtin", ["--task", "tabular", "--dataset", "wine", "--target", "y"], ["--target", "CSV"]),
    ("target_with_text_only", ["--task", "text", "--target", "y"], ["--target", "CSV"]),
    ("unknown_dataset", ["--task", "tabular", "--dataset", "bogus"], ["--dataset", "bogus", "digits"]),
    ("empty_text", ["--task", "text", "--text", "{empty}"], ["--text", "empty.csv", "at least 100 characters"]),
    ("tiny_text", ["--task", "text", "--text", "{tiny}"], ["--text", "tiny.txt", "at least 100 characters"]),
    ("latin_text", ["--task", "text", "--text", "{latin}"], ["--text", "not UTF-8"]),
])
def test_compare_refuses_bad_data_before_training(case, flags, needles, files, capsys, monkeypatch):
    import gatedmoe.arena as arena

    monkeypatch.setattr(arena, "run_text_arena", lambda *a, **k: pytest.fail("trained before checking the data"))
    monkeypatch.setattr(arena, "run_tabular_arena", lambda *a, **k: pytest.fail("trained before checking the data"))
    flags = [str(files[f[1:-1]]) if f.startswith("{") else f for f in flags]
    _fails(["compare", "--out", files["tmp"] / "o", "--no-progress", "--steps", "2", *flags], capsys, *needles)
