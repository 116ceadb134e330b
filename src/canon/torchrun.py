"""What torchrun tells the processes it starts, read from their environment without importing
torch: canon's command line asks before it loads torch (`canon recipes` never does)."""

from __future__ import annotations

import os


def launched_by_torchrun() -> bool:
    """Whether torchrun (torch.distributed.run) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ
