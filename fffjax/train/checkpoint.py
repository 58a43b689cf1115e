"""Checkpoints: the one module that saves, resumes, checks and loads them.

A checkpoint is a directory of orbax items. Two writers share one layout:

- `save_checkpoint` writes a model checkpoint: `params` (any pytree of arrays with string keys,
  e.g. `nnx.to_pure_dict(nnx.state(model, nnx.Param))` or a `fffjax.v1` parameter dict) and
  `config` (a JSON-serialisable dict: what is needed to rebuild the model).
- `RunCheckpoints` writes a training run's steps `<run>/checkpoints/<step>/` (an orbax
  `CheckpointManager`: async saves, `LatestN` preservation, a save every `save_every` steps)
  with the same `params` and `config` (the `ModelConfig` dict) plus `opt_state` (the optax state,
  restored with its NamedTuple types and shardings), `data` (the input-pipeline position
  `{"epoch", "index", "seed"}`), `run` (the step, the `TrainConfig` dict, anything the caller adds
  such as task and tokenizer path, and the digest below) and `metrics` (of the saved step).

Integrity: orbax writes into a temporary name and renames only once every file is written, so a
crash never leaves a half-written checkpoint under its final name. A complete but damaged step (a
truncated or corrupted file; silent bit flips are caught by `tree_digest`, a CRC-32 of the arrays
stored in the `run` item and checked on restore in single-process runs) fails to restore with a
`CheckpointCorruptError` naming the directory; `RunCheckpoints.restore_latest` then warns and falls
back to the next older step. The digest is computed only for a step that is saved, in the background
part of the save (see `RunCheckpoints.save`), so training does not wait for it.

Reading for inference: `resolve_checkpoint` names the directory (a checkpoint, the one in an
`fffjax demo` output folder, or the latest step of a run), `load_params` reads its parameters as
host arrays with its config and run record, `load_checkpoint` rebuilds the crammed-BERT model it
holds (`load_bert_checkpoint` the BERT encoder `save_bert_checkpoint` wrote, FFF slots and all),
and `inspect_checkpoint` describes any checkpoint (config, parameter counts, step, metrics)
without reading an array. They read only the `params` and `config` items (and the run record as
plain JSON), raise `FileNotFoundError` saying what a path is when it is no checkpoint, and
`CheckpointCorruptError` naming the checkpoint when an item cannot be read. `fffjax export`,
`fffjax inspect` and `fffjax finetune` read checkpoints through these functions.
"""

import concurrent.futures
import contextlib
import dataclasses
import json
import shutil
import threading
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fffjax.models.bert import Bert, bert_checkpoint_config, bert_from_params, bert_params, is_bert_checkpoint_config
from fffjax.models.config import ModelConfig
from fffjax.models.crammed_bert import model_from_params, model_kind
from fffjax.models.decoder import MODEL_NAME as DECODER_MODEL_NAME

PARAMS, CONFIG, OPT_STATE, DATA, RUN, METRICS = "params", "config", "opt_state", "data", "run", "metrics"
JSON_ITEMS = (CONFIG, DATA, RUN, METRICS)


class CheckpointCorruptError(RuntimeError):
    """A checkpoint directory exists but cannot be restored."""


# --------------------------------------------------------------------------- model checkpoints


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**{
        PARAMS: ocp.StandardCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler()}))


def save_checkpoint(path: str | Path, params: Any, config: dict, *, overwrite: bool = False) -> Path:
    """Write ``params`` and ``config`` to the directory ``path`` (atomically; blocks until done).

    Args:
        path: checkpoint directory; it must not exist unless ``overwrite``.
        params: pytree of arrays (jax or numpy).
        config: JSON-serialisable dict.
        overwrite: replace an existing checkpoint at ``path``.

    Returns:
        The absolute checkpoint path.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a JSON-serialisable dict, got {type(config).__name__}")
    try:
        json.dumps(config)
    except (TypeError, ValueError) as error:
        raise TypeError(f"config must be JSON-serialisable: {error}") from error
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"path {path} already exists (pass overwrite=True to replace it)")
    with _checkpointer() as checkpointer:
        checkpointer.save(
            path,
            args=ocp.args.Composite(**{
                PARAMS: ocp.args.StandardSave(params),
                CONFIG: ocp.args.JsonSave(config),
            }),
            force=overwrite,
        )
    return path


@contextlib.contextmanager
def _unreadable_as_corrupt(path: Path):
    """Turns any failure to read the checkpoint at ``path`` into a `CheckpointCorruptError` naming it
    (orbax and tensorstore raise many types for damaged files)."""
    try:
        yield
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        raise CheckpointCorruptError(
            f"checkpoint {path} is unreadable ({type(error).__name__}: {first_line})") from error


def read_config(path: str | Path) -> dict:
    """The JSON config of the checkpoint at ``path``, without reading any array.

    Raises:
        CheckpointCorruptError: when the config item is missing or unreadable.
    """
    path = Path(path).absolute()
    with _unreadable_as_corrupt(path):
        items = _read_json_items(path, (CONFIG,))
        if CONFIG not in items:
            raise FileNotFoundError(f"no {CONFIG} item")
    return dict(items[CONFIG])


def _params_metadata(path: Path) -> Any:
    """The tree of array metadata (shape, dtype) of the checkpoint's ``params`` item.

    The item is read through its own handler, not the composite one: that one warns about every
    other item of a training step (``opt_state``, ``data``, ...) it has no handler for.
    """
    with _unreadable_as_corrupt(path), contextlib.closing(ocp.StandardCheckpointHandler()) as handler:
        tree = handler.metadata(path / PARAMS)
    return getattr(tree, "tree", tree)


def restore_checkpoint(path: str | Path, target: Any | None = None) -> tuple[Any, dict]:
    """Read ``(params, config)`` from the checkpoint at ``path``.

    Args:
        path: a directory written by :func:`save_checkpoint` (or a step of :class:`RunCheckpoints`).
        target: optional pytree of arrays or ``jax.ShapeDtypeStruct`` giving the structure,
            dtypes and shardings to restore into; without it the structure, shapes and dtypes
            come from the checkpoint's metadata (nested dicts, arrays on the default device).

    Returns:
        ``(params, config)``.

    Raises:
        FileNotFoundError: when ``path`` holds no ``params/``.
        CheckpointCorruptError: naming ``path`` when its items cannot be read.
    """
    path = Path(path).absolute()
    if not (path / PARAMS).is_dir():
        raise FileNotFoundError(f"path {path} is not a checkpoint written by save_checkpoint (no {PARAMS}/)")
    config = read_config(path)
    if target is None:
        abstract = jax.tree.map(lambda meta: jax.ShapeDtypeStruct(meta.shape, meta.dtype), _params_metadata(path))
    else:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with _unreadable_as_corrupt(path), contextlib.closing(ocp.StandardCheckpointHandler()) as handler:
        params = handler.restore(path / PARAMS, args=ocp.args.StandardRestore(abstract))
    return params, config


# --------------------------------------------------------------------------- integrity


def tree_digest(tree) -> str | None:
    """A CRC-32 over every leaf's bytes, dtype and shape, in tree order; None when a leaf is not
    fully addressable here (several processes: each holds only its shards)."""
    crc = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return None
        host = np.ascontiguousarray(np.asarray(leaf))
        crc = zlib.crc32(f"{host.dtype}{host.shape}".encode(), crc)
        crc = zlib.crc32(host.view(np.uint8).reshape(-1) if host.size else b"", crc)
    return f"{crc:08x}"


# --------------------------------------------------------------------------- training runs


def _jsonable(tree: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(tree, default=lambda x: np.asarray(x).tolist()))


def _snapshot(tree):
    """A copy of every array of `tree` that outlives the next train step (which donates the state's
    buffers): jax arrays copied on their devices in one `device_put` (no compilation), others on the host."""
    leaves, treedef = jax.tree.flatten(tree)
    on_device = [leaf for leaf in leaves if isinstance(leaf, jax.Array)]
    copies = iter(jax.device_put(on_device, [leaf.sharding for leaf in on_device], may_alias=False))
    return jax.tree.unflatten(treedef, [next(copies) if isinstance(leaf, jax.Array) else np.array(leaf, copy=True)
                                        for leaf in leaves])


# How long the digest waits for the save call to return before it starts anyway.
DIGEST_START_TIMEOUT_S = 60.0


@dataclasses.dataclass
class _RunRecordSave(ocp.args.CheckpointArgs):
    """The `run` item: `record` (JSON) and the arrays whose `tree_digest` it gets under "digest"
    (`None`: no digest, when the arrays are not all addressable by this process). The digest starts
    once `saved` is set: after orbax's blocking copy of the arrays to the host, which it would
    otherwise share the device-to-host link with."""

    record: dict[str, Any]
    arrays: Any
    saved: threading.Event


class _RunRecordHandler(ocp.handlers.JsonCheckpointHandler):
    """Writes the `run` item as orbax's JSON handler does, with the digest of the arrays saved beside it
    computed in the save's commit thread: in an async save, after `save` has returned and while
    training goes on. It restores as a plain JSON item (`ocp.args.JsonRestore`)."""

    async def async_save(self, directory, item=None, args=None):
        if not isinstance(args, _RunRecordSave):
            return await super().async_save(directory, item, args)

        async def write_with_digest():
            args.saved.wait(DIGEST_START_TIMEOUT_S)
            digest = None if args.arrays is None else tree_digest(args.arrays)
            await self._save_fn({**args.record, "digest": digest}, directory)

        return [ocp.future.CommitFutureAwaitingContractedSignals(write_with_digest(), name="run_digest")]


class RunCheckpoints:
    """An orbax `CheckpointManager` for one training run.

    Args:
        directory: where step directories go (created).
        save_every: save when `step % save_every == 0` (plus `force=True` saves); a step at or
            before the latest saved one is never saved again.
        keep: how many of the latest steps to keep.
        async_save: write in the background (call `wait` or `close` before reading). In a
            single-process run the whole save, orbax's copy of the arrays to the host included, runs
            in a background thread on a device copy of the state; with several processes orbax's
            own async save is used (its cross-process barriers stay on the calling thread).
    """

    def __init__(self, directory: Path | str, *, save_every: int, keep: int = 3, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every, keep: expected positive ints, got {save_every}, {keep}")
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._async_save = async_save
        self.save_every = save_every
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.LatestN(n=keep),
            enable_async_checkpointing=async_save,
            enable_background_delete=async_save,
        )
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        run_handler = _RunRecordHandler()
        registry.add(RUN, _RunRecordSave, run_handler)
        registry.add(RUN, ocp.args.JsonRestore, run_handler)
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
        self._saver = (concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fffjax-checkpoint")
                       if async_save and jax.process_count() == 1 else None)
        self._pending: concurrent.futures.Future | None = None
        self._pending_step: int | None = None

    def save(self, step: int, *, params, opt_state, position: Mapping[str, Any], config: Mapping[str, Any],
             run: Mapping[str, Any], metrics: Mapping[str, Any], force: bool = False) -> bool:
        """Saves when the interval policy (or `force`) says so; returns whether it does.

        Nothing is copied for a step that is not saved. For a saved step, in a single-process async
        run, the call copies the parameters and optimizer state on their devices (the next train step
        donates their buffers), waits for the previous save's thread, and returns: orbax's copy to the
        host, the files and the digest (`tree_digest`, a CRC-32 of the arrays) are written in the
        background. With several processes the call blocks while orbax copies the arrays to the host,
        and the digest is skipped when the arrays are not all addressable here. The `run` item holding
        the digest is written before the step gets its final name. A failed background save raises
        from the next `save`, `wait` or `close`.
        """
        step = int(step)
        if not self.should_save(step, force=force):
            return False
        self._finish_pending()
        state = {PARAMS: params, OPT_STATE: opt_state}
        addressable = all(leaf.is_fully_addressable for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array))
        snapshot = _snapshot(state) if addressable else None
        if self._saver is not None and snapshot is not None:
            state = snapshot
        saved = threading.Event()
        if not self._async_save:
            saved.set()  # a synchronous save returns only after the digest
        args = ocp.args.Composite(**{
            PARAMS: ocp.args.StandardSave(state[PARAMS]),
            OPT_STATE: ocp.args.StandardSave(state[OPT_STATE]),
            CONFIG: ocp.args.JsonSave(_jsonable(config)),
            DATA: ocp.args.JsonSave(_jsonable(position)),
            RUN: _RunRecordSave(_jsonable({**run, "step": int(step)}), snapshot, saved),
            METRICS: ocp.args.JsonSave(_jsonable(metrics)),
        })

        def write() -> bool:
            try:
                return bool(self.manager.save(step, args=args, force=True))  # decided above
            finally:
                saved.set()

        if self._saver is not None and snapshot is not None:
            self._pending, self._pending_step = self._saver.submit(write), step
            return True
        return write()

    def should_save(self, step: int, *, force: bool = False) -> bool:
        """Whether `save(step, force=force)` saves: a multiple of `save_every` (or `force`) after the
        latest saved step."""
        latest = self._pending_step if self._pending is not None else self.manager.latest_step()
        return (force or int(step) % self.save_every == 0) and (latest is None or int(step) > latest)

    def _finish_pending(self) -> None:
        """Waits for the background save thread (re-raising its error)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

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
        """Blocks until every save has been written (re-raising a background save's error)."""
        self._finish_pending()
        self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._saver is not None:
                self._saver.shutdown(wait=True)
            self.manager.close()

    def __enter__(self) -> "RunCheckpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- reading for inference


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory (holding ``params/``) that ``path`` names: itself, the checkpoint of
    an `fffjax demo` output folder (``path/checkpoint/``), or the latest step of a training run
    (``path/<step>/`` or ``path/checkpoints/<step>/``).

    Raises:
        FileNotFoundError: a one-line message saying what ``path`` is instead (missing, a file, a
            Hugging Face folder, a run without steps, ...).
    """
    path = Path(path).absolute()
    for candidate in (path, path / "checkpoint"):
        if (candidate / PARAMS).is_dir():
            return candidate
    for root in (path / "checkpoints", path):
        if root.is_dir():
            steps = [p for p in root.iterdir() if p.name.isdigit() and (p / PARAMS).is_dir()]
            if steps:
                return max(steps, key=lambda p: int(p.name))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is a file; an fffjax checkpoint is a directory holding {PARAMS}/")
    if (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is a Hugging Face folder, not an fffjax checkpoint; "
                                f"`fffjax import {path} OUT` reads a published-layout folder into one")
    if (path / "checkpoints").is_dir():
        raise FileNotFoundError(f"run directory {path} has no complete step checkpoint in checkpoints/ yet")
    raise FileNotFoundError(
        f"checkpoint {path} is neither an fffjax checkpoint (no {PARAMS}/) nor a run directory with step checkpoints")


def _read_json_items(step_dir: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """The JSON items of a checkpoint that exist, read as plain files (orbax's JSON handler writes
    ``<item>/metadata``; a ``CheckpointManager`` writes its reserved ``metrics`` item as
    ``metrics/metrics``)."""
    items = {}
    for name in names:
        for candidate in (step_dir / name / "metadata", step_dir / name / name):
            if candidate.is_file():
                items[name] = json.loads(candidate.read_text())
                break
    return items


def _run_record(step_dir: Path) -> dict[str, Any]:
    """``{"path", "step", "run", "metrics"}`` of a checkpoint (step from the run item or the folder name)."""
    extra = _read_json_items(step_dir, (RUN, METRICS))
    run = extra.get(RUN) or {}
    step = run.get("step", int(step_dir.name) if step_dir.name.isdigit() else None)
    return {"path": str(step_dir), "step": step, "run": run, "metrics": extra.get(METRICS)}


def run_record(checkpoint: str | Path) -> dict[str, Any]:
    """``{"path", "step", "run", "metrics"}`` of a checkpoint or the latest step of a run, without
    reading an array (``run`` is the run information the trainer recorded, ``{}`` if none)."""
    return _run_record(resolve_checkpoint(checkpoint))


def crammed_bert_config(config: Mapping[str, Any], path: str | Path) -> ModelConfig:
    """The crammed-BERT `ModelConfig` a checkpoint's config item describes.

    Accepts a `ModelConfig` dict, a published ``config.json`` dict (with an ``arch`` block), or a
    run JSON's ``{"model": {...}}``. Raises ``ValueError`` naming the checkpoint ``path`` for any
    other config; for `fffjax demo`'s (FFF-v1 and FF parameter dicts, their ``specs`` in the config)
    the message says so and where the demo's own export of its FFF-v1 is.
    """
    if isinstance(config.get("model"), Mapping):
        config = config["model"]
    if config.get("model") == DECODER_MODEL_NAME:
        raise ValueError(f"checkpoint {path} holds a causal language model, not crammed BERT; load it with "
                         "fffjax.generate.load_causal_lm")
    if is_bert_checkpoint_config(config):
        raise ValueError(f"checkpoint {path} holds a BERT encoder (fffjax.models.bert), not crammed BERT; load it "
                         "with fffjax.train.checkpoint.load_bert_checkpoint or fffjax.from_pretrained")
    if "vocab_size" in config:
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig.from_dict({k: v for k, v in config.items() if k in names})
    if "arch" in config:
        return ModelConfig.from_arch(config)
    if config.get("model") == "fffjax.nn.FFF" and "specs" in config:
        raise ValueError(
            f"checkpoint {path} holds the FFF-v1 and FF models of `fffjax demo`, not a crammed-BERT model (the only "
            "kind `fffjax export` writes and `fffjax finetune --init` reads); `fffjax demo` exports its FFF-v1 "
            f"itself, to fastfeedforward's layout: {Path(path).parent / 'fff.safetensors'} "
            "(in Python: fffjax.convert.export_fastfeedforward)")
    described = f" (its config names model {config['model']!r})" if "model" in config else ""
    raise ValueError(f"checkpoint {path} does not hold a crammed-BERT model{described}: its config has neither "
                     "vocab_size nor an arch block; `fffjax inspect` describes any checkpoint")


def load_params(checkpoint: str | Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``(params, config, record)`` of a checkpoint or the latest step of a run.

    ``params`` are host numpy arrays, ``config`` is the config item as stored, ``record`` is
    ``{"path", "step", "run", "metrics"}`` (step and metrics ``None`` when not recorded).
    """
    step_dir = resolve_checkpoint(checkpoint)
    params, config = restore_checkpoint(step_dir)
    return jax.tree.map(np.asarray, params), config, _run_record(step_dir)


def load_checkpoint(checkpoint: str | Path, *, implementation: str | None = None):
    """``(model, info)``: the crammed-BERT model of a checkpoint or run directory, in eval mode.

    ``info``: ``{"path", "kind", "config", "step", "metrics"}`` (``kind`` "mlm" or "classifier";
    step and metrics ``None`` when the checkpoint does not record them). A checkpoint of another
    model raises ``ValueError`` (see :func:`crammed_bert_config`).
    """
    step_dir = resolve_checkpoint(checkpoint)
    config = crammed_bert_config(read_config(step_dir), step_dir)
    params, _ = restore_checkpoint(step_dir)
    kind = model_kind(params)
    model = model_from_params(config, params, kind=kind, implementation=implementation)
    record = _run_record(step_dir)
    return model, {"path": record["path"], "kind": kind, "config": config, "step": record["step"],
                   "metrics": record["metrics"]}


def save_bert_checkpoint(path: str | Path, bert: Bert, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a :class:`~fffjax.models.bert.Bert` as a model checkpoint: its parameters and
    :func:`~fffjax.models.bert.bert_checkpoint_config` (the config and each layer's feedforward spec,
    so that FFF slots are rebuilt), plus ``tokenizer``'s files (a `fffjax.data.tokenizer.Tokenizer`)
    in the checkpoint folder when given, where `fffjax.from_pretrained` finds them. Returns the path."""
    config = bert_checkpoint_config(bert)
    path = save_checkpoint(path, jax.tree.map(np.asarray, bert_params(bert)), config, overwrite=overwrite)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def load_bert_checkpoint(checkpoint: str | Path, *, implementation: str | None = None) -> Bert:
    """The :class:`~fffjax.models.bert.Bert` of a checkpoint written by :func:`save_bert_checkpoint` (or
    the latest step of a run whose config is a BERT one), in eval mode, float32. A checkpoint of another
    model raises ``ValueError`` naming its model."""
    params, config, record = load_params(checkpoint)
    if not is_bert_checkpoint_config(config):
        raise ValueError(f"checkpoint {record['path']} does not hold a BERT encoder: its config names model "
                         f"{config.get('model')!r}, not 'bert'")
    return bert_from_params(config, params, implementation=implementation)


def inspect_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """Config, parameter counts, step and metrics of any checkpoint, without reading an array.

    Returns ``{"path", "kind", "config", "parameters", "step", "metrics"}``. For a crammed-BERT
    checkpoint ``kind`` is "mlm" or "classifier" and ``config`` the `ModelConfig` dict; otherwise
    ``kind`` is the config's ``model`` entry (or "unknown") and ``config`` the stored dict.
    ``parameters`` counts the total and each top-level group (``encoder.*`` one level deeper).
    """
    step_dir = resolve_checkpoint(checkpoint)
    tree = _params_metadata(step_dir)
    counts: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, prefix + (str(key),))
        elif hasattr(node, "shape"):
            group = ".".join(prefix[:2]) if prefix[:1] == ("encoder",) else prefix[0] if prefix else "params"
            counts[group] = counts.get(group, 0) + int(np.prod(node.shape))

    walk(tree, ())
    stored = read_config(step_dir)
    try:
        config = crammed_bert_config(stored, step_dir).to_dict()
        kind = "classifier" if "head" in tree or "pooler" in tree else "mlm"
    except ValueError:
        config, kind = stored, str(stored.get("model", "unknown"))
    record = _run_record(step_dir)
    return {
        "path": record["path"],
        "kind": kind,
        "config": config,
        "parameters": {"total": sum(counts.values()), **dict(sorted(counts.items()))},
        "step": record["step"],
        "metrics": record["metrics"],
    }
