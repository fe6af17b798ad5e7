"""zo2.train: zo2-tune's ``train`` subcommand as a function, run in this process."""

from __future__ import annotations

import json
import numbers
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

from ._errors import InvalidTypeError
from ._types import TrainResult
from ._zo2 import _resume_out, _train

Record = Dict[str, Any]
ProgressArg = Union[bool, None, Callable[[Record], Optional[bool]]]


def _flag_value(name: str, value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value  # (None: the binding leaves the flag out)
    if type(value).__module__ == "numpy" and isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        # numpy's str of a scalar: the shortest digits that read back as the same value of its
        # own precision (np.float32(1e-3) is "0.001"); its repr is "np.float64(0.001)" with numpy 2.
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))  # an int subclass or np.int64: its digits (an IntEnum's str is its name)
    if isinstance(value, numbers.Real):
        # A float (or a float subclass, a Fraction): the shortest digits that read back as the
        # same double (1e-06); repr of a subclass would be its own spelling.
        return repr(float(value))
    if isinstance(value, (str, bytes)):
        return value  # a path as the OS spells it: the binding passes it on with os.fsencode
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)) and name == "lora_targets":
        # As Session(lora_targets=[...]): the flag's comma-separated names.
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise InvalidTypeError(f"lora_targets[{i}] must be a str, not {type(item).__name__}")
        return ",".join(value)
    if isinstance(value, (list, tuple, dict, set)):
        raise InvalidTypeError(f"train option {name} takes one value, not a {type(value).__name__} ({value!r})")
    return str(value)


def _num(value: Any, spec: str) -> str:
    return "nan" if value is None else format(value, spec)


class _TqdmBar:
    def __init__(self, total: Optional[int]):
        from tqdm import tqdm  # noqa: imported only when installed

        self._tqdm = tqdm
        self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def __call__(self, rec: Record) -> None:
        if "step" in rec:
            self.bar.update(rec["step"] - self.bar.n)
            # A skipped step's loss and g, and a non-finite evaluation's loss, are null.
            self.bar.set_postfix(loss=_num(rec.get("loss"), ".4f"), g=_num(rec.get("g"), "+.2e"), refresh=False)
        elif "eval_after_step" in rec:
            extra = f", accuracy {rec['eval_accuracy']:.4f}" if "eval_accuracy" in rec else ""
            self._tqdm.write(f"eval after step {rec['eval_after_step']}: loss {_num(rec.get('eval_loss'), '.4f')}{extra}")

    def close(self) -> None:
        self.bar.close()


PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]


def train(model: Optional[PathArg] = None, *, data: Optional[PathArg] = None,
          out: Optional[PathArg] = None, progress: ProgressArg = True, verbose: Optional[bool] = None,
          **options: Any) -> TrainResult:
    """Fine-tune a checkpoint with MeZO steps: ``zo2-tune train`` as a function.

    This runs zo2-tune's own ``train`` (tools/cmd_train.cpp) in this process — the same
    flag checks, data reading, run directory, resume, evaluation and saving — with the
    keyword arguments as its flags: ``steps=300`` is ``--steps 300``, ``batch_size=16`` is
    ``--batch-size 16``, ``lr_schedule="linear"``, ``gpu_mem="4G"``, ``storage_dtype="bf16"``,
    ``eval="dev.jsonl"``, ``resume="out/run"``; MeZO's names work too
    (``learning_rate=1e-3``, ``max_steps=300``, ``zo_eps=1e-3``, ``per_device_train_batch_size=16``);
    a boolean flag takes True/False (``overwrite=True``, ``shuffle=False``). See
    ``zo2-tune train --help`` for every option. ``model`` is ``--model`` (None with ``resume=``).
    A number may be any real number (``np.float32(1e-3)``, ``np.int64(300)``). An option
    given as None is left out: train's default applies (``eval=None``: no evaluation;
    ``lr=None``: train's default lr, 1e-6), and ``resume=None`` starts a new run.

    out: the run directory to write (``--out``). With ``resume=`` it may be left out: the run
        continues in the run being resumed (the run directory, or the run whose ``current`` or
        step directory ``resume`` names), as ``zo2-tune train --resume DIR`` does; ``result.out``
        is that run.

    progress: True (default) — a tqdm bar when tqdm is installed, else train's own progress
        lines on stderr; False — only train's log lines; a callable — called with every
        ``--log-json`` record (a dict per step: step, loss_plus, loss_minus, loss, g, lr,
        tokens, tokens_per_s, ...; a dict per evaluation: eval_after_step, eval_loss, ...).
        Returning False from it stops the run after the step in progress when the callback
        returns: training goes on while the records are delivered (losses are read a step
        behind), so that is one or two steps past the record's — ``result.steps`` ends with
        the last step run, and the warning names it. The run saves (resume with
        ``resume=out``) and returns with ``stopped=True``. An exception from it (a
        KeyboardInterrupt too) stops the run the same way, is logged as "stopped by the
        progress callback (it raised ...)", and is re-raised once the run is saved.
    verbose: whether train's own info lines and status line also print (default: only when
        no tqdm bar or callback is used).
    log_json: also write the records to this file: train's own ``--log-json``, with its
        checks (never a file of the run, its model, tokenizer or data) and its resume
        behaviour (records past the checkpoint trimmed; kept by a resume in place).

    Ctrl-C (SIGINT; also SIGTERM, SIGUSR1, ...) finishes the current step, saves, and raises
    KeyboardInterrupt (a second Ctrl-C ends the process, as with the CLI). Python delivers
    signals to the main thread: a train on another thread saves and returns with
    ``stopped=True``, and the KeyboardInterrupt (or the program's own handler) comes in the
    main thread. Errors raise zo2's exceptions with train's message
    (a bad value: InvalidArgumentError; a malformed data file: FormatError; ...).
    Returns a :class:`TrainResult` with the records of the steps and evaluations it ran.
    """
    if not (progress is None or isinstance(progress, bool) or callable(progress)):
        raise InvalidTypeError(f"progress must be True, False, None or a callable, not {type(progress).__name__} "
                               f"({progress!r})")
    if not (verbose is None or isinstance(verbose, bool)):
        raise InvalidTypeError(f"verbose must be True, False or None, not {type(verbose).__name__} ({verbose!r})")
    if options.get("resume", 0) is None:
        del options["resume"]  # None: a new run, as leaving it out
    if out is None and "resume" not in options:
        raise InvalidTypeError("out must be a path (str, bytes or os.PathLike), not NoneType: name the run directory "
                               "to write (it may be left out only with resume=, to continue that run in place)")
    for name, path in (("model", model), ("data", data), ("out", out)):
        if path is not None and not isinstance(path, (str, bytes, os.PathLike)):
            raise InvalidTypeError(f"{name} must be a path (str, bytes or os.PathLike), not {type(path).__name__}")
    args = []
    if model is not None:
        args.append(("model", _flag_value("model", model)))
    if data is not None:
        args.append(("data", _flag_value("data", data)))
    if out is not None:
        args.append(("out", _flag_value("out", out)))
    for name, value in options.items():
        args.append((name, _flag_value(name, value)))

    if out is None:
        # train picks the run being resumed (tools/cmd_train.cpp); the same choice, for result.out.
        # (None when resume names no run: train refuses it with its message.)
        resolved = _resume_out(options["resume"]) if isinstance(options["resume"], (str, bytes, os.PathLike)) else None
        resume = options["resume"]
        out_path = Path(resolved if resolved is not None else
                        os.fsdecode(resume) if isinstance(resume, (str, bytes, os.PathLike)) else str(resume))
    else:
        out_path = Path(os.fsdecode(out))
    result = TrainResult(out=out_path)
    user_cb: Optional[Callable[[Record], Optional[bool]]] = None
    bar: Optional[_TqdmBar] = None
    if callable(progress):
        user_cb = progress
    elif progress:
        try:
            total = options.get("steps", options.get("max_steps"))
            bar = _TqdmBar(int(total) if total is not None else (None if "resume" in options else 100))
        except ImportError:
            bar = None
    quiet = not verbose if verbose is not None else (user_cb is not None or bar is not None)

    def on_record(line: str) -> Optional[bool]:
        rec = json.loads(line)
        (result.evals if "eval_after_step" in rec else result.steps).append(rec)
        if bar is not None:
            bar(rec)
        if user_cb is not None:
            keep = user_cb(rec)
            if keep is not None and not keep:
                return False
        return True

    try:
        rc = _train(args, on_record, quiet)
    finally:
        if bar is not None:
            bar.close()
    result.stopped = rc == 130
    return result
