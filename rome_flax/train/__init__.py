"""Layer 5 of rome_flax: training. The method registry (`methods`), losses, the jitted step (`train_step`),
the loop with hooks (`trainer`), grouped options (`train_config`), the stage schedule, Orbax checkpoints and
self-sampling (TOKEE's stage 2). Imports the layers below it."""
