"""The environment variables that tune the CUDA paths and the CPU kernels' vector width
(README, "Backends"), read where they are used: a bad value is an RSPError naming the variable
and the values it takes (the command line checks them all at its start), never an error at
import, nor a value taken silently for another."""
from __future__ import annotations

import math
import os

from .errors import RSPError

CUDA_DENSE_PATHS = ("grouped_conv", "implicit_gemm", "filter", "conv")  # conv_paths.py says what each does


def _choice(choices: tuple[str, ...]):
    def parse(name: str, text: str) -> str:
        if text not in choices:
            raise RSPError(f"{name}={text!r}: choose one of {', '.join(choices)}")
        return text
    return parse


def _switch(name: str, text: str) -> bool:
    if text not in ("0", "1"):  # "yes" or "true" meant off, without a word
        raise RSPError(f"{name}={text!r}: choose 1 (on) or 0 (off)")
    return text == "1"


def _weight(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise RSPError(f"{name}={text!r}: give a number above 0 (inf: never)")
    return value


VARIABLES = {
    "RSP_FAST_CUDA_DENSE_PATH": _choice(CUDA_DENSE_PATHS),
    "RSP_FAST_CUDA_GRAM_SLOWDOWN": _weight,
    "RSP_FAST_CUDA_IMPLICIT_GRAM": _switch,
    "RSP_FAST_CUDA_FUSED_FIRST_LAYER": _switch,
    # read by the C++ depthwise kernel at each call too (csrc/cpu/vector_clones.h), which takes the same values
    "RSP_FAST_CPU_CAPABILITY": _choice(("avx512", "avx2", "default")),
}


def setting(name: str):
    """The value of the variable ``name`` (one of VARIABLES), None where it is unset or empty."""
    text = os.environ.get(name)
    return VARIABLES[name](name, text.strip()) if text and text.strip() else None


def check_settings() -> None:
    """Every variable's value, checked: a CPU run never reads them, but a bad one is a mistake to say."""
    for name in VARIABLES:
        setting(name)
