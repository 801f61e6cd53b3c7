"""Training: the run config, building a run, the jitted step and its loss, the loop and its pieces,
checkpoints, the run directory, data parallelism, metric writers.

From Python::

    from advisor import advise
    from flax_lora.training import config_from_advice, train

    advice = advise(samples=2000, vram_gb=12)
    cfg = config_from_advice(advice, model=None, data=None, output="run", overrides={"max_steps": 200})
    result = train(cfg, advice_json=advice.to_json())
"""

from flax_lora.training.config import RunConfig, advice_for, config_from_advice
from flax_lora.training.loop import train

__all__ = ["RunConfig", "advice_for", "config_from_advice", "train"]
