"""zo2: zeroth-order (MeZO / SPSA) fine-tuning of OPT, LLaMA, Qwen, Mistral and Gemma 3 models, from Python.

A thin binding over zo2's C API (include/zo2.h) — the same runtime, validation and messages
as the C API and ``zo2-tune``::

    import numpy as np, zo2

    model = zo2.Model.load("out/micro")
    with zo2.Session(model, device="cpu", lr=1e-3, eps=1e-3, max_seqs=8, max_seq_len=64) as s:
        r = s.step(np.asarray(ids, dtype=np.int32))     # [n_seq, n_tokens]
        print(r.loss_plus, r.loss_minus, r.projected_grad)
        s.save("out/tuned")

    zo2.train("out/micro", data="train.jsonl", out="out/run", steps=300, lr=1e-3)

    tok = zo2.Tokenizer.from_dir("out/micro")
    with zo2.Session("out/run", training=False, generate_seqs=4, max_seqs=4, max_seq_len=96) as s:
        print(s.generate_text(tok, ["The movie was"], max_new_tokens=32)[0].text)

Errors raise :class:`zo2.Error` subclasses, one per status code, with zo2's message.
Steps release the GIL; Ctrl-C stops a step loop between steps (the step that was running
completes; the session stays usable, so it can still be saved).
"""

from __future__ import annotations

from os import PathLike
from typing import Any, Union

from ._errors import (AbortedError, DeviceError, Error, FileIOError, FormatError, InternalError,
                      InvalidArgumentError, InvalidTypeError, OutOfMemoryError, UnsupportedError)
from ._types import Generation, Plan, TrainResult
from ._zo2 import Model, Session, StepResult, Tokenizer, set_log_level
from ._zo2 import __version__
from ._zo2 import _plan
from ._train import train

__all__ = [
    "Model", "Session", "StepResult", "Tokenizer", "Generation", "Plan", "TrainResult", "plan", "train",
    "set_log_level", "Error", "InvalidArgumentError", "InvalidTypeError", "FileIOError", "FormatError",
    "UnsupportedError", "OutOfMemoryError", "DeviceError", "InternalError", "AbortedError",
    "__version__",
]


def plan(model: Union[Model, str, "PathLike[str]"], **params: Any) -> Plan:
    """The placement a :class:`Session` with these parameters would run, without opening the
    device or allocating anything (zo2_plan). ``model`` is a :class:`Model` or a checkpoint
    directory; ``params`` are Session's keyword parameters. A cap below the minimum raises
    :class:`OutOfMemoryError` with ``minimum_cap_bytes`` set."""
    return _plan(model, **params)
