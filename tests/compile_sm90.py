"""Compile Triton kernels for an sm90 GPU without a GPU, with whatever Triton is importable,
and report ptxas' register spills: the shared part of the offline compile checks
(`tests/dispatch/compile_lora_kernels.py`, `tests/gates/compile_gate_kernels.py`). Not a
pytest module.

The interpreter (TRITON_INTERPRET=1, the CPU tests) accepts code that the GPU's compiler
rejects; a check built on this catches those cases before a GPU run, e.g. with the GPU's
Triton 3.6 (``pip install --no-deps --target /tmp/t36 triton==3.6.0``, then
``PYTHONPATH=/tmp/t36:src python tests/<folder>/compile_<name>.py``).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
NOT_CONSTEXPR = 3

# (name, kernel, argument types, constexprs, warps, stages)
Variant = tuple[str, Callable, dict, dict, int, int]


@triton.jit
def _control(x_ptr):
    tl.store(x_ptr, NOT_CONSTEXPR)


def compile_one(fn, types: dict, consts: dict, warps: int = 8, stages: int = 4) -> tuple[str, str]:
    """Compile ``fn`` with argument ``types`` and ``consts``: ``(error or '', ptxas' spill line)``.

    Pointer arguments are compiled as 16-byte aligned, as the JIT specialises the pointers of
    torch's allocations: without it loads lose their vector width, are not pipelined and may
    spill, which is not the code that runs. An integer is specialised as the JIT does for a
    value divisible by 16 when its type says so (``"i32:16"``); plain ``"i32"`` is the
    awkward size, where a kernel can spill that does not at E = 64 or D = 2048."""
    names = [p.name for p in fn.params]
    args = {n: types[n].split(":")[0] for n in names if n not in consts}
    signature = {n: "constexpr" if n in consts else args[n] for n in names}
    constexprs = {(names.index(n),): v for n, v in consts.items()}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if n not in consts and (types[n].startswith("*") or types[n].endswith(":16"))}
    try:
        ck = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned),
                            target=TARGET, options={"num_warps": warps, "num_stages": stages})
    except Exception as exc:  # noqa: BLE001 (report every failure, then exit non-zero)
        return f"{type(exc).__name__}: {str(exc)[:2000]}", ""
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    spills = ""
    if ptxas.exists():
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ck.asm["ptx"])
            f.flush()
            out = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", f.name, "-o", "/dev/null"],
                                 capture_output=True, text=True).stderr
        spills = " ".join(line.strip() for line in out.splitlines() if "spill" in line)
    return "", spills


def run(variants: Iterable[Variant], only: str = "") -> int:
    """Compile every variant whose name contains ``only``, print one line each, then check that
    the control kernel (reading a global that is not a constexpr) is rejected. Returns the exit
    status: 1 if a variant failed or the control compiled."""
    print(f"triton {triton.__version__}, target {TARGET}")
    failed = 0
    for name, fn, types, consts, warps, stages in variants:
        if only not in name:
            continue
        err, spills = compile_one(fn, types, consts, warps, stages)
        print("FAIL" if err else "ok  ", f"{name:75s}", err or spills[:100])
        failed += bool(err)
    control, _ = compile_one(_control, {"x_ptr": "*i32"}, {})
    print("ok   control rejected" if control else "FAIL control compiled: the check does not see compile errors")
    return 1 if failed or not control else 0


if __name__ == "__main__":
    sys.exit("run tests/dispatch/compile_lora_kernels.py or tests/gates/compile_gate_kernels.py")
