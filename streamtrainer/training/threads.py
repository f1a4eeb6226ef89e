"""One setting for the CPU threads a training process's arithmetic uses: torch's and BLAS's."""

from __future__ import annotations

import logging

import threadpoolctl
import torch

logger = logging.getLogger(__name__)


def set_intra_op_threads(threads: int) -> None:
    """Torch's intra-op threads, and those of the BLAS the compiled loop calls; process-wide.

    The compiled loop trains a hidden layer's micro-batches by matrix products
    through SciPy's BLAS (numba's ``np.dot``), whose OpenBLAS would otherwise
    start a thread per core for large groups. One thread is the default for the
    reason torch gets one: beside the broker and librdkafka on this 2-core
    machine, more threads fight them for the cores. Alone, more threads do pay
    (groups of 256, d=128, in memory: 0.41 us a record with two, 0.51 with
    one), hence a setting. threadpoolctl limits only libraries already loaded,
    so SciPy's BLAS is loaded here first (~0.15 s, which the loop pays anyway).
    """
    torch.set_num_threads(threads)
    import scipy.linalg.cython_blas  # noqa: F401 - loads the BLAS numba's np.dot calls

    threadpoolctl.threadpool_limits(limits=threads, user_api="blas")
    logger.debug("intra-op threads: %d (torch and BLAS)", threads)
