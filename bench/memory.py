"""Peak memory of a block of code: resident set on CPU (Linux), allocator peak on CUDA."""

from __future__ import annotations

from pathlib import Path

import torch

from app.heap import trim_heap

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from {STATUS}")


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.extra_mib`: the most memory the block held
    beyond what was resident when it started (inputs already allocated are not counted)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.extra_mib = 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            trim_heap()  # hand freed heap back, so reuse of retained memory cannot hide a peak
            CLEAR_REFS.write_text("5")  # resets VmHWM (the peak resident set) to the current VmRSS
            self._base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kib("VmHWM") * 1024
        self.extra_mib = max(0, peak - self._base) / 2**20
