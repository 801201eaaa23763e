"""Serving without HTTP, for applications: `rome_flax.serving.Engine(model, policy, slots=...)` and
`submit(texts) -> Future` (issue 20's Python API). The engine is defined in `rome_flax.engine.serving`;
this module keeps its public names at the address applications use."""

from rome_flax.engine.serving import (DeadlineExceeded, Engine, LocalSteps, Overloaded, Prediction, RequestError,
                                      ShuttingDown, WordPredictions, make_policy)

__all__ = ["Engine", "LocalSteps", "Prediction", "WordPredictions", "make_policy", "Overloaded", "DeadlineExceeded",
           "RequestError", "ShuttingDown"]
