"""Analysis of finished runs: the report's tables and figures (:mod:`.report`) and the
paper's tables (:mod:`.paper`). Read-only: nothing here trains or changes a result."""
