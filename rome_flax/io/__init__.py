"""Layer 1 of rome_flax: files and processes. The one atomic writer and output-directory rules (`files`),
checksum manifests (`integrity`), one run per directory (`runlock`), SIGTERM / SIGINT handling
(`preemption`), process-0 decisions (`primary`) and device meshes and `jax.distributed` (`sharding`).
Imports nothing of rome_flax's above `errors`."""
