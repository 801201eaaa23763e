"""Layer 2 of rome_flax: the multi-exit backbone. `config` (ModelConfig), `layers`, `heads` (what an exit
computes), `encoder` (the one layer loop, `layer_and_exit`, the two parameter layouts), `convert` (Hugging
Face tensors <-> params), `pretrained` (MultiExitBert: load, call, save), `targets` (regression targets),
`export_hf` and `modeling_rome_flax` (the model back in Hugging Face format). Imports `io` only."""
