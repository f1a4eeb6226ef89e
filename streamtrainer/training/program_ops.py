"""The operation codes of a lowered program: written by lowering.py, run by program_loops.py.

A module of plain constants, so that both can import it: lowering imports torch,
program_loops numba (and its compiler child process imports neither torch nor the package).
"""

from __future__ import annotations

from typing import Final

LINEAR: Final = 0
RELU: Final = 1
LEAKY_RELU: Final = 2
TANH: Final = 3
SIGMOID: Final = 4
GELU: Final = 5
GELU_TANH: Final = 6
SILU: Final = 7
ELU: Final = 8
LAYER_NORM: Final = 9
