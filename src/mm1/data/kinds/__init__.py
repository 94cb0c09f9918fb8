"""The data kinds, each a registered component (`base.DataKind`); adding one is a module + a line here.

| kind        | on disk                                                                       |
|-------------|-------------------------------------------------------------------------------|
| caption     | WebDataset tars, img2dataset layout (`mm1.data.tars`); or JSONL {"image","caption"} |
| interleaved | parquet, OBELICS layout: texts / images lists, one non-null per position      |
| text        | JSONL {"text"} or parquet with a `text` column                                 |
| sft         | LLaVA JSON list or JSONL {"id","image","conversations"}                        |

A batch's `source` column is the kind's index in `KINDS.names()` (sorted, so no import order matters).
"""

from mm1.data.kinds import caption, interleaved, sft, text  # noqa: F401  (registers the built-in kinds)
from mm1.data.kinds.base import KINDS, DataKind, ReadContext, get_kind

__all__ = ["KINDS", "DataKind", "ReadContext", "get_kind"]
