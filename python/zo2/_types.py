"""Plain result types of the zo2 package."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional


@dataclass(frozen=True)
class Plan:
    """The placement of a model's blocks under a device memory cap (zo2_plan_result)."""

    cap_bytes: int               #: the cap planned for
    device_bytes: int            #: predicted device arena peak
    minimum_cap_bytes: int       #: the smallest cap this model and these parameters run under
    n_blocks: int                #: transformer blocks
    n_resident: int              #: blocks kept on the device
    n_streamed: int              #: blocks streamed through the window each step
    window: int                  #: device slots for streamed blocks (0 when none stream)
    block_bytes: int             #: one block image in the storage dtype
    globals_bytes: int           #: embeddings, final norm, head (always resident)
    h2d_bytes_per_step: int      #: host -> device traffic per step
    d2h_bytes_per_step: int      #: device -> host traffic per step
    predicted_transfer_s: float  #: transfer-bound step time (seconds)
    host_bytes: int              #: host memory of the master weights (the RAM tier with a disk tier)
    n_disk_blocks: int = 0       #: streamed blocks on the disk tier (host_mem)
    disk_file_bytes: int = 0     #: the disk tier's block file
    disk_read_bytes_per_step: int = 0
    disk_write_bytes_per_step: int = 0  #: divided by disk_lag
    predicted_disk_s: float = 0.0  #: disk-bound step time at 2 GB/s read, 1.5 GB/s write (seconds)
    tile_slots: int = 0          #: sub-block streaming (tile=): device slots of one weight tile; 0 = whole blocks
    tile_slot_bytes: int = 0     #: one tile slot
    tiles_per_block: int = 0     #: weight tiles one block streams in


@dataclass(frozen=True)
class Generation:
    """One prompt's result of :meth:`Session.generate` / :meth:`Session.generate_text`."""

    tokens: List[int]            #: the new token ids (a stop id that ended it included)
    stopped: bool                #: a stop id (or generate_text's stop string) ended it, not max_new_tokens
    text: Optional[str] = None   #: generate_text: the new tokens' text (special tokens left out, cut at a stop string)


@dataclass
class TrainResult:
    """What :func:`zo2.train` returns.

    ``steps`` and ``evals`` are train's ``--log-json`` records (README, zo2-tune train),
    one dict per step run by this call and per evaluation.
    """

    out: Path
    steps: List[Dict[str, Any]] = field(default_factory=list)
    evals: List[Dict[str, Any]] = field(default_factory=list)
    #: The run stopped before its last step, saved (``resume=out`` continues it): a progress
    #: callback returned False, or a stop signal (Ctrl-C) came while train ran on a thread
    #: other than the main one (Python raises its KeyboardInterrupt in the main thread).
    stopped: bool = False

    @property
    def final_loss(self) -> Optional[float]:
        """(L+ + L-)/2 of the last step run, or None."""
        return self.steps[-1]["loss"] if self.steps else None

    @property
    def last_eval(self) -> Optional[Dict[str, Any]]:
        """The last evaluation record (eval_loss, eval_accuracy, ...), or None."""
        return self.evals[-1] if self.evals else None
