"""trl's fused LM head (trl.trainer.utils.add_fused_lm_head, which trl's SFT and DPO trainers call with
`fused_lm_head=True`) run on the positions whose log-probs are read, on every device."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trl.trainer.utils


@contextlib.contextmanager
def completion_positions_only() -> Iterator[None]:
    """Within the block, trl's fused LM head projects only the completion positions on every device, as it does on
    CUDA; the process is left as it was after it.

    trl 1.16 (utils.add_fused_lm_head) projects only the positions whose label is not -100 when `_use_triton(device)`
    is true, and every position otherwise, so that tile shapes stay fixed for compilers such as Neuron's. On CPU that
    runs the LM head, its softmax statistics and their backward over the prompt positions too, whose log-probs are
    then zeroed: about half of a DPO step on the default task (prompts are longer than the reviews), and of SFT's
    LM-head work (its loss is on the completions). The log-probs, the loss and every logged metric are the same
    either way (tests/stages/test_dpo.py); DPO steps take half the time. `trl.trainer.utils._use_triton` is private,
    so it is replaced only while a trainer is built (DPO's reference log-probs may be precomputed there) and runs,
    then restored: other trainers in the process (a chain runs several) see trl as shipped. The choice of kernel is
    `trl.kernels.chunked_logprob._use_triton`, a separate name, left alone.
    """
    shipped = trl.trainer.utils._use_triton
    trl.trainer.utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl.trainer.utils._use_triton = shipped
