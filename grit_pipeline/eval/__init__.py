"""Grounding evaluation: MDETR-layout annotations, the public predictions format, and scoring (issue 13).

The submodules are imported on use (`grit_pipeline.eval.annotations`, `.predictions`, `.scoring`);
this package itself holds only the error every user-facing evaluation failure derives from.
"""

from __future__ import annotations


class EvalError(ValueError):
    """A user error in evaluation input (annotations, predictions): its message is one clear line."""
