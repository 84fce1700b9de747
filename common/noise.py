"""Library messages that tell a lab user nothing, silenced once, here, each with the reason it is harmless.

`quiet_library_noise()` is called by the CLI before anything runs; what a user then sees is the lab's progress and
the libraries' real warnings. Causes the lab controls are fixed where they arise instead (e.g. the Trainer's
`dataloader_pin_memory` is off without an accelerator: common/config.py).
"""

from __future__ import annotations

import logging
import re
import warnings

# A transformers LOAD REPORT row: "score.weight | MISSING | ".
_REPORT_ROW = re.compile(r"^([\w.]+)\s*\|\s*([A-Z_]+)\s*\|", re.MULTILINE)
# The scalar head of AutoModelForSequenceClassification (Llama, Qwen, Mistral, ... name it `score`).
SCALAR_HEAD = "score"


class ScalarHeadLoadReport(logging.Filter):
    """Drops transformers' LOAD REPORT when the only keys it lists are the scalar head's, missing.

    A reward model loads its base as a sequence classifier, whose `score` head no base checkpoint has: the
    reward-model stage trains it from scratch, and `reward_model.api` loads the trained head right after the base.
    A report that lists any other key (a truncated checkpoint, a wrong architecture) still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = _REPORT_ROW.findall(message)
        return not rows or not all(key.split(".")[0] == SCALAR_HEAD and status == "MISSING" for key, status in rows)


_SCALAR_HEAD_FILTER = ScalarHeadLoadReport()


def quiet_library_noise() -> None:
    """Install the filters below (idempotent: a filter is added once)."""
    # peft (PeftModel.__init__) and trl (models/utils.py) read transformers' deprecated `is_gradient_checkpointing`
    # alias on every model they wrap; the lab never does, and nothing a user can change would stop it.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.getLogger("transformers.modeling_utils").addFilter(_SCALAR_HEAD_FILTER)
    # bitsandbytes announces, at import, an optional hub-downloaded CPU kernel it falls back from.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
