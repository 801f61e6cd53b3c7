"""Checkpoints of a run with orbax: train state (LoRA, AdamW, step, RNG) + data position.

``RUN/checkpoints/<step>/`` holds ``state`` (an orbax PyTree) and ``meta`` (JSON: step, data
position, eval loss). The manager keeps the last ``keep`` checkpoints and, among those with an
eval loss, the best one. With several processes every process calls ``save`` and ``restore``
(orbax coordinates them; the folder must be one that every host sees).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from flax_lora.data.batch import Position
from flax_lora.training.step import TrainState


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int = 3):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as cm

        self._ocp = ocp
        policy = cm.AnyPreservationPolicy([
            cm.LatestN(n=keep),
            cm.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1, keep_checkpoints_without_metrics=False),
        ])
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(preservation_policy=policy, create=True, enable_async_checkpointing=False),
        )

    def save(self, state: TrainState, position: Position, eval_loss: float | None = None) -> int:
        from flax_lora.training.parallel import to_host

        step = int(to_host(state.step))
        meta = {"step": step, "epoch": position.epoch, "batch": position.batch, "eval_loss": eval_loss}
        self.manager.save(
            step,
            args=self._ocp.args.Composite(state=self._ocp.args.StandardSave(state._asdict()), meta=self._ocp.args.JsonSave(meta)),
            metrics={"eval_loss": eval_loss} if eval_loss is not None else None,
            force=True,
        )
        return step

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def drop_after(self, step: int) -> list[int]:
        """Delete the checkpoints after ``step`` (a diverged run's unverified ones); their steps."""
        dropped = [s for s in self.manager.all_steps() if s > step]
        for s in dropped:
            self.manager.delete(s)
        return dropped

    def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, Position, dict[str, Any]]:
        """The state at ``step`` (default: latest), shaped and placed like ``like``, and its data position."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like._asdict())
        got = self.manager.restore(
            step, args=self._ocp.args.Composite(state=self._ocp.args.StandardRestore(abstract), meta=self._ocp.args.JsonRestore())
        )
        meta = dict(got["meta"])
        return TrainState(**got["state"]), Position(meta["epoch"], meta["batch"]), meta

    def close(self) -> None:
        self.manager.close()
