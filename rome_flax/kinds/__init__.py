"""Layer 3 of rome_flax: what a task is. `kind` (the TaskKind seam: classification, regression, token
labelling; everything above asks it instead of branching), `tasks` (TaskSpec per task), `sources` (where a
split comes from), reading and encoding data (`data`, `token_data`, `synthetic`), scoring it (`metrics`) and
its prediction files (`writers`). Imports `io` and `model`."""
