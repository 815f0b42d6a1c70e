"""What a compiled call issues to ATen: a TorchDispatchMode counting every op (the no-host-sync tests)."""
from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

# Tensor methods that read device memory back to the host; the no-sync tests patch them to fail.
SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


class DispatchRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))
