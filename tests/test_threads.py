"""The intra-op thread setting reaches torch and the BLAS the compiled loop calls."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# A fresh process: SciPy's BLAS must not be loaded before the setting is applied, as in a
# worker that has not compiled its loop yet (threadpoolctl limits only libraries loaded).
_CHILD = """
import json, sys
import torch
from threadpoolctl import threadpool_info
from streamtrainer.training.threads import set_intra_op_threads
loaded_before = "scipy.linalg.cython_blas" in sys.modules
set_intra_op_threads(int(sys.argv[1]))
print(json.dumps({
    "loaded_before": loaded_before,
    "loaded_after": "scipy.linalg.cython_blas" in sys.modules,
    "torch": torch.get_num_threads(),
    "blas": [entry["num_threads"] for entry in threadpool_info() if entry["user_api"] == "blas"],
}))
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_torch_and_the_loops_blas_take_the_setting(threads: int) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(threads)], capture_output=True, text=True, timeout=120, check=True
    )
    seen = json.loads(done.stdout.strip().splitlines()[-1])

    assert not seen["loaded_before"] and seen["loaded_after"]  # the setting loaded the BLAS itself
    assert seen["torch"] == threads
    assert seen["blas"] and set(seen["blas"]) == {threads}
