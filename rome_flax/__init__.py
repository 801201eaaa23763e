"""rome_flax: multi-exit BERT / RoBERTa in JAX/Flax with RomeBERT's robust training."""

from rome_flax.errors import RomeFlaxError
from rome_flax.model.config import ModelConfig
from rome_flax.model.encoder import MultiExitOutput, embed, forward, init_params, run_exit, run_layer
from rome_flax.model.pretrained import ExportInfo, MultiExitBert, MultiExitRoberta

__all__ = ["ModelConfig", "RomeFlaxError", "MultiExitOutput", "MultiExitBert", "MultiExitRoberta", "ExportInfo",
           "embed", "forward", "init_params", "run_exit", "run_layer"]
__version__ = "0.1.0"
