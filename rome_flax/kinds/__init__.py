"""Layer 3 of rome_flax: what a task is. `tasks` (TaskSpec: sentence classification, regression, token
labelling), reading and encoding its data (`data`, `token_data`, `synthetic`) and scoring it (`metrics`).
Imports `io` and `model`."""
