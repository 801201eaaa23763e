"""Layer 4 of rome_flax: early exit. The policies (`exit_policy.Policy`: `ExitPolicy`, `token_policy.TokenPolicy`),
the open engine (`scheduler`: init / admit / run / evict over slots), the jitted paths (`early_exit`,
`token_exit`), passes over a dataset (`inference`), the offline sweep, timing and evaluation (`sweep`,
`speed`, `evaluation`), thresholds with guarantees (`calibration`), serving (`serving`) and exported
artefacts (`artefact`, `artefact_runtime`). Imports `io`, `model` and `kinds`."""
