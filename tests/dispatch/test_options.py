"""`gatedmoe.dispatch.options`: the backends' options values."""

import subprocess
import sys
from dataclasses import FrozenInstanceError

import pytest

from gatedmoe.dispatch.options import FP8Recipe, TritonOptions
from gatedmoe.dispatch.triton.config import (
    KERNELS,
    KernelConfig,
    configs_from_ints,
    configs_to_ints,
)

CFG = KernelConfig(64, 64, 32, 4, 2)


def test_defaults():
    options = TritonOptions()
    assert options.fp32_scatter is False and options.configs is None and options.decode is None


def test_unknown_kernel_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="'glu_fwdd'") as info:
        TritonOptions(configs={"glu_fwdd": CFG})
    for name in KERNELS:
        assert name in str(info.value)


@pytest.mark.parametrize("kwargs", [{"fp32_scatter": 1}, {"decode": 1}, {"configs": {"wgrad": (64, 64, 32, 4, 2)}},
                                    {"configs": [("wgrad", CFG)]}])
def test_wrong_types_raise(kwargs):
    with pytest.raises(TypeError):
        TritonOptions(**kwargs)


def test_positional_arguments_are_refused():
    with pytest.raises(TypeError):
        TritonOptions(True)


def test_frozen_hashable_and_detached_from_the_callers_dict():
    configs = {"wgrad": CFG}
    options = TritonOptions(fp32_scatter=True, configs=configs)
    configs["glu_fwd"] = CFG  # the caller's dict changing does not change the value
    assert dict(options.configs) == {"wgrad": CFG}
    with pytest.raises(FrozenInstanceError):
        options.fp32_scatter = False
    with pytest.raises(TypeError):
        options.configs["gemm_fwd"] = CFG
    assert options == TritonOptions(fp32_scatter=True, configs={"wgrad": CFG})
    assert hash(options) == hash(TritonOptions(fp32_scatter=True, configs={"wgrad": CFG}))
    assert len({options, TritonOptions(fp32_scatter=True, configs={"wgrad": CFG}), TritonOptions()}) == 2
    assert TritonOptions(configs={}) == TritonOptions()


def test_configs_as_ints_round_trip():
    configs = {"wgrad": CFG, "glu_fwd": KernelConfig(128, 128, 64, 8, 4, group_m=16, tma=False, pregather=True)}
    assert configs_from_ints(configs_to_ints(configs)) == configs
    assert configs_to_ints(None) == [] and configs_from_ints(None) == {}


def test_options_and_config_import_no_triton():
    # TritonOptions (and the KernelConfig it holds) work on machines without Triton.
    code = ("import sys, gatedmoe.dispatch, gatedmoe.dispatch.options, gatedmoe.dispatch.triton.config; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fp8_recipe_defaults_and_validation():
    assert TritonOptions().fp8 is None
    recipe = FP8Recipe()
    assert (recipe.scaling, recipe.grad_format, recipe.block) == ("rowwise", "e4m3", 128)
    assert TritonOptions(fp8=FP8Recipe(scaling="rowwise")) == TritonOptions(fp8=FP8Recipe(scaling="rowwise"))
    hash(TritonOptions(fp8=recipe))
    with pytest.raises(ValueError, match="scaling.*'tensorwise'.*blockwise, rowwise"):
        FP8Recipe(scaling="tensorwise")
    with pytest.raises(ValueError, match="grad_format.*'e4m3fn'.*e4m3, e5m2"):
        FP8Recipe(grad_format="e4m3fn")
    for block in (96, 8, 0, 128.0, True):
        with pytest.raises(ValueError, match="block must be a power of two >= 16"):
            FP8Recipe(block=block)
    with pytest.raises(TypeError, match="fp8 must be an FP8Recipe"):
        TritonOptions(fp8="e4m3")
