"""Periodic orbax checkpoints of a training run and resume from the latest readable one.

Layout: `<run>/checkpoints/<step>/` (an orbax `CheckpointManager`, async saves, `LatestN`
preservation, `FixedIntervalPolicy` save interval) with the items

- `params`: the model's `nnx.Param` state as a pure dict (the same item `fffjax.train.checkpoint`
  writes, so `restore_checkpoint(<run>/checkpoints/<step>)` and the exporters read it);
- `config`: the `ModelConfig` dict (JSON);
- `opt_state`: the optax state (restored with its NamedTuple types and shardings);
- `data`: the input-pipeline position `{"epoch", "index", "seed"}` (JSON);
- `run`: the step, the `TrainConfig` dict and anything the caller adds (task, tokenizer path);
- `metrics`: the metrics of the saved step (JSON).

A step directory appears under its final name only when complete (orbax writes to a temporary
name first), so a run killed mid-save leaves the previous steps intact. A complete but damaged
checkpoint (a truncated or corrupted file; silent bit flips are caught by a CRC-32 of the arrays
stored in the `run` item, checked on restore in single-process runs) fails to restore: `restore_latest` then warns with a
`CheckpointCorruptError` naming the directory and falls back to the next older step.
"""

import json
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

PARAMS, CONFIG, OPT_STATE, DATA, RUN, METRICS = "params", "config", "opt_state", "data", "run", "metrics"
JSON_ITEMS = (CONFIG, DATA, RUN, METRICS)


class CheckpointCorruptError(RuntimeError):
    """A checkpoint directory exists but cannot be restored."""


def tree_digest(tree) -> str | None:
    """A CRC-32 over every leaf's bytes, dtype and shape, in tree order; None when a leaf is not
    fully addressable here (several processes: each holds only its shards)."""
    import jax

    crc = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return None
        host = np.ascontiguousarray(np.asarray(leaf))
        crc = zlib.crc32(f"{host.dtype}{host.shape}".encode(), crc)
        crc = zlib.crc32(host.view(np.uint8).reshape(-1) if host.size else b"", crc)
    return f"{crc:08x}"


def _jsonable(tree: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(tree, default=lambda x: np.asarray(x).tolist()))


class RunCheckpoints:
    """An orbax `CheckpointManager` for one training run.

    Args:
        directory: where step directories go (created).
        save_every: save when `step % save_every == 0` (plus `force=True` saves).
        keep: how many of the latest steps to keep.
        async_save: write in a background thread (call `wait` or `close` before reading).
    """

    def __init__(self, directory: Path | str, *, save_every: int, keep: int = 3, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every, keep: expected positive ints, got {save_every}, {keep}")
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.LatestN(n=keep),
            save_decision_policy=policies.FixedIntervalPolicy(interval=save_every),
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, *, params, opt_state, position: Mapping[str, Any], config: Mapping[str, Any],
             run: Mapping[str, Any], metrics: Mapping[str, Any], force: bool = False) -> bool:
        """Saves when the interval policy (or `force`) says so; returns whether it did."""
        args = ocp.args.Composite(**{
            PARAMS: ocp.args.StandardSave(params),
            OPT_STATE: ocp.args.StandardSave(opt_state),
            CONFIG: ocp.args.JsonSave(_jsonable(config)),
            DATA: ocp.args.JsonSave(_jsonable(position)),
            RUN: ocp.args.JsonSave(_jsonable({**run, "step": int(step),
                                              "digest": tree_digest({PARAMS: params, OPT_STATE: opt_state})})),
            METRICS: ocp.args.JsonSave(_jsonable(metrics)),
        })
        return bool(self.manager.save(int(step), args=args, force=force))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def restore(self, step: int, abstract_state: Mapping[str, Any]) -> dict[str, Any]:
        """Restores one step into `abstract_state` (`{"params", "opt_state"}` of `ShapeDtypeStruct`s).

        Raises:
            CheckpointCorruptError: naming the step directory when anything fails to read.
        """
        args = ocp.args.Composite(
            **{PARAMS: ocp.args.StandardRestore(abstract_state[PARAMS]),
               OPT_STATE: ocp.args.StandardRestore(abstract_state[OPT_STATE])},
            **{name: ocp.args.JsonRestore() for name in JSON_ITEMS})
        try:
            restored = self.manager.restore(int(step), args=args)
            result = {name: restored[name] for name in (PARAMS, OPT_STATE, *JSON_ITEMS)}
            if result[RUN] is None or int(result[RUN]["step"]) != int(step):
                raise ValueError(f"run item records step {None if result[RUN] is None else result[RUN].get('step')}")
            expected = result[RUN].get("digest")
            found = tree_digest({PARAMS: result[PARAMS], OPT_STATE: result[OPT_STATE]})
            if expected is not None and found is not None and expected != found:
                raise ValueError(f"array contents do not match the saved digest ({found} != {expected})")
        except Exception as error:  # orbax/tensorstore raise many types for damaged files
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            raise CheckpointCorruptError(
                f"checkpoint {self.step_dir(step)} is unreadable ({type(error).__name__}: {first_line})") from error
        result[DATA] = {k: np.asarray(v, np.int64) for k, v in result[DATA].items()}
        return result

    def restore_latest(self, abstract_state: Mapping[str, Any], *, quarantine: bool = True) -> dict[str, Any] | None:
        """The newest step that restores, warning about each newer unreadable one; None if none.

        Args:
            abstract_state: as for `restore`.
            quarantine: move each unreadable step folder to `<directory>.corrupt/<step>` (kept for
                inspection) so that training can save that step again.

        Returns:
            `{"params", "opt_state", "config", "data", "run", "metrics", "step"}` or None.
        """
        import shutil

        import jax

        for step in reversed(self.steps()):
            try:
                result = self.restore(step, abstract_state)
            except CheckpointCorruptError as error:
                note = ""
                if quarantine and jax.process_index() == 0:
                    target = Path(f"{self.directory}.corrupt") / str(step)
                    if target.exists():
                        shutil.rmtree(target)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(self.step_dir(step)), str(target))
                    self.manager.reload()
                    note = f" (moved to {target})"
                warnings.warn(f"{error}{note}; falling back to an older checkpoint", stacklevel=2)
                continue
            result["step"] = step
            return result
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> "RunCheckpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
