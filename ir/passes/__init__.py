"""IR passes and the default PIPELINE (pure Graph -> Graph functions, run by the manager)."""
from .cleanup import FOLD_RULES, cse, dce, fold_constants
from .fuse import fuse
from .manager import PassContext, PassRecord, run_passes

PIPELINE = [
    ("cse", cse),
    ("fold_constants", fold_constants),
    ("dce", dce),
    ("fuse", fuse),
]

__all__ = ["FOLD_RULES", "PIPELINE", "PassContext", "PassRecord", "cse", "dce", "fold_constants", "fuse",
           "run_passes"]
