"""`gatedmoe.bench.report`: the plain-text table `gatedmoe bench` prints."""

from gatedmoe.bench.report import format_rows


def _row(mem: float) -> dict:
    return {"shape": "T=8 D=4", "backend": "grouped", "pass": "fwd", "ms": 1.5, "tokens_per_s": 5333.0,
            "tflops": 0.01, "fraction_of_ceiling": 0.25, "extra_mem_gb": mem}


def test_memory_measured_only_on_cuda_prints_a_dash_and_says_why():
    cpu = format_rows([_row(float("nan"))]).splitlines()
    assert "nan" not in "\n".join(cpu)
    assert cpu[2].split()[-1] == "-" and "25.0%" in cpu[2]
    assert "measured on CUDA only" in cpu[-1]
    cuda = format_rows([_row(0.125)]).splitlines()
    assert cuda[2].split()[-1] == "0.12" and len(cuda) == 3
