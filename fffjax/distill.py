"""A pretrained BERT's feedforward layers converted into FFF trees, stage by stage, then the whole
student distilled on the teacher's sentence embeddings.

The stages are those of :mod:`fffjax.convert.dense_to_fff`, applied to every layer on the teacher's
own feedforward inputs (:func:`teacher_layer_inputs`), and one more on the whole model:

- ``a``: the tree initialised from the dense layer, no training;
- ``b``: routers (and output rows) fitted on the teacher's hidden states;
- ``c``: layer-wise distillation: each layer regresses its dense layer's output, layers independent;
- ``d``: end-to-end distillation (:func:`distill_end_to_end`): the student's sentence embeddings
  regress the teacher's (``1 - cosine``), optionally with two more terms: every layer's output against
  the teacher's (the dense per-token signal of layer-wise BERT distillation, which a pooled vector
  lacks) and the batch's pairwise similarities against the teacher's (what the Spearman measure
  ranks); every parameter but the embeddings trained, through the inference path itself (hard
  routing, eval mode), so what is trained is what runs.

:func:`convert_bert` runs stages ``a`` to ``c`` and yields the student after each, so that each stage
can be measured; the student is a copy of the teacher whose ``layer.ffn`` slots hold the converted
layers (``fffjax.nn.FFF``, ``fffjax.nn.UltraFastFF``, or a narrower ``DenseFfn`` for the dense baseline
of equal active width).
"""

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import Array
from jaxtyping import Float, Int

from fffjax import ops
from fffjax.convert import dense_to_fff
from fffjax.models.bert import Bert, DenseFfn, ffn_inputs, layer_outputs, sentence_embedding
from fffjax.text import embed
from fffjax.train.optim import with_standard_promotion

STAGES = ("a", "b", "c", "d")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """What to convert into and how hard to work at it.

    ``kind``: ``"fff_v1"``, ``"fff_v2"`` or ``"dense"`` (the narrow dense baseline); ``fraction``: the
    feedforward neurons active per token, as a fraction of the dense width
    (:func:`fffjax.convert.dense_to_fff.spec_for_fraction`); ``last_stage``: the last of
    :data:`STAGES` to run. ``layer_*``: stage ``c`` (token vectors sampled per layer, Adam steps, batch,
    learning rate); ``e2e_*``: stage ``d`` (steps, sentences per batch, learning rate, and the weights
    of its two optional loss terms, :func:`end_to_end_loss`); ``max_length``: tokens per sentence in
    stage ``d``.
    """

    kind: str
    fraction: float
    last_stage: str = "d"
    layer_tokens: int = 32768
    layer_steps: int = 1000
    layer_batch: int = 512
    layer_learning_rate: float = 3e-3
    e2e_steps: int = 300
    e2e_batch: int = 32
    e2e_learning_rate: float = 3e-4
    e2e_hidden_weight: float = 0.0
    e2e_similarity_weight: float = 0.0
    max_length: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.kind not in dense_to_fff.KINDS:
            raise ValueError(f"kind: expected one of {dense_to_fff.KINDS}, got {self.kind!r}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction: expected in (0, 1], got {self.fraction}")
        if self.last_stage not in STAGES:
            raise ValueError(f"last_stage: expected one of {STAGES}, got {self.last_stage!r}")
        for name in ("layer_tokens", "layer_steps", "layer_batch", "e2e_steps", "e2e_batch", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected at least 1, got {getattr(self, name)}")
        for name in ("e2e_hidden_weight", "e2e_similarity_weight"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name}: expected a weight >= 0, got {getattr(self, name)}")

    def stages(self) -> tuple[str, ...]:
        """The stages this config runs, in order."""
        return STAGES[:STAGES.index(self.last_stage) + 1]


def dense_layer_params(ffn: DenseFfn) -> dict[str, jax.Array]:
    """A ``DenseFfn`` slot's ``{"w_in" (H, F), "b_in" (F,), "w_out" (F, H), "b_out" (H,)}``."""
    if not isinstance(ffn, DenseFfn):
        raise ValueError(f"ffn: the teacher's feedforward slots must be DenseFfn, got {type(ffn).__name__}")
    return {name: getattr(ffn, name)[...] for name in dense_to_fff.DENSE_KEYS}


def teacher_layer_inputs(teacher: Bert, tokenizer, sentences: Sequence[str], *, n_tokens: int,
                         max_length: int = 128, batch_size: int = 64, seed: int = 0) -> list[np.ndarray]:
    """Up to ``n_tokens`` of each layer's feedforward inputs ``(n, H)`` float32, one array per layer:
    the non-padding token vectors of ``sentences`` (in order, until enough are gathered), subsampled
    with ``seed``; every layer sees the same tokens."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens: expected at least 1, got {n_tokens}")
    gathered: list[list[np.ndarray]] = [[] for _ in teacher.layers]
    count = 0
    inputs = nnx.jit(ffn_inputs)
    for start in range(0, len(sentences), batch_size):
        ids, mask = tokenizer.encode_longest(list(sentences[start:start + batch_size]), max_length)
        width = -(-ids.shape[1] // 16) * 16
        ids = np.pad(ids, ((0, 0), (0, width - ids.shape[1])))
        mask = np.pad(mask, ((0, 0), (0, width - mask.shape[1])))
        keep = mask.reshape(-1).astype(bool)
        for layer, h in enumerate(inputs(teacher, jnp.asarray(ids), jnp.asarray(mask))):
            gathered[layer].append(np.asarray(h).reshape(-1, h.shape[-1])[keep])
        count += int(keep.sum())
        if count >= n_tokens:
            break
    rows = np.random.default_rng(seed).permutation(count)[:n_tokens]
    return [np.concatenate(parts)[rows] for parts in gathered]


def _slot(params: dict, spec: dict[str, Any], hidden_size: int) -> nnx.Module:
    if spec["kind"] == "dense":
        ffn = DenseFfn(hidden_size, spec["width"], rngs=nnx.Rngs(0))
        for name in dense_to_fff.DENSE_KEYS:
            getattr(ffn, name)[...] = jnp.asarray(params[name], jnp.float32)
        return ffn
    return dense_to_fff.to_module(params, spec)


def student_from_layers(teacher: Bert, layer_params: Sequence[dict], spec: dict[str, Any]) -> Bert:
    """A copy of ``teacher`` (eval mode) whose layer ``i`` feedforward holds ``layer_params[i]``."""
    if len(layer_params) != len(teacher.layers):
        raise ValueError(f"layer_params: expected one per layer ({len(teacher.layers)}), got {len(layer_params)}")
    student = nnx.clone(teacher)
    for layer, params in zip(student.layers, layer_params):
        layer.ffn = _slot(params, spec, teacher.config.hidden_size)
    student.eval()
    return student


@dataclasses.dataclass(frozen=True)
class StageResult:
    """The student after one stage, with each layer's error against its dense layer on the stage's
    inputs (:func:`fffjax.convert.dense_to_fff.relative_error`) and the layer-wise loss curves (stage c)."""

    stage: str
    student: Bert
    layer_params: list[dict]
    layer_errors: list[dict[str, float]]
    loss_curves: list[np.ndarray] | None = None


def convert_bert(teacher: Bert, layer_inputs: Sequence[np.ndarray], config: DistillConfig,
                 progress: Callable[[str], None] | None = None) -> Iterator[StageResult]:
    """Stages ``a`` to ``c`` (those of ``config.stages()``) on every feedforward layer of ``teacher``;
    yields a :class:`StageResult` after each. ``layer_inputs``: :func:`teacher_layer_inputs`."""
    if len(layer_inputs) != len(teacher.layers):
        raise ValueError(f"layer_inputs: expected one array per layer ({len(teacher.layers)}), got {len(layer_inputs)}")
    dense = [dense_layer_params(layer.ffn) for layer in teacher.layers]
    spec = dense_to_fff.spec_for_fraction(config.kind, teacher.config.intermediate_size, config.fraction)
    say = progress or (lambda message: None)
    params: list[dict] = []
    curves = None
    for stage in (s for s in config.stages() if s != "d"):
        new = []
        curves = [] if stage == "c" else None
        for i, (d, x) in enumerate(zip(dense, layer_inputs)):
            x = jnp.asarray(x)
            if stage == "a":
                new.append(dense_to_fff.init_from_dense(d, spec, x, seed=config.seed))
            elif stage == "b":
                new.append(dense_to_fff.fit_routers(d, params[i], spec, x))
            else:
                trained, curve = dense_to_fff.distill_layer(
                    d, params[i], spec, x, steps=config.layer_steps, batch_size=config.layer_batch,
                    learning_rate=config.layer_learning_rate, seed=config.seed + i)
                new.append(trained)
                curves.append(curve)
            say(f"stage {stage}: layer {i + 1}/{len(dense)} done")
        params = new
        errors = [dense_to_fff.relative_error(d, p, spec, jnp.asarray(x))
                  for d, p, x in zip(dense, params, layer_inputs)]
        yield StageResult(stage, student_from_layers(teacher, params, spec), params, errors, curves)


def _bert_params_filter(path, _value) -> bool:
    """Trained in stage d: every parameter outside the embeddings."""
    return not any(getattr(entry, "key", None) == "embeddings" for entry in path)


def end_to_end_loss(student_layers: Sequence[Float[Array, "batch seq hidden"]],
                    teacher_layers: Sequence[Float[Array, "batch seq hidden"]] | None,
                    mask: Int[Array, "batch seq"], target: Float[Array, "batch hidden"], *,
                    hidden_weight: float = 0.0, similarity_weight: float = 0.0) -> Float[Array, ""]:
    """Stage ``d``'s loss on one batch, a float32 scalar:

    - ``1 - cos`` of the student's sentence embedding (of its last layer's output) and ``target``, the
      teacher's normalised embedding ``(B, H)``, averaged over the batch;
    - plus ``hidden_weight`` x the mean over layers of the relative squared error of each layer's output
      against the teacher's, ``sum |s - t|^2 / sum |t|^2`` over the batch's tokens (``mask`` 1);
    - plus ``similarity_weight`` x the mean squared error of the batch's pairwise cosine similarities
      (off the diagonal) against the teacher's.

    ``student_layers``: every layer's output (:func:`fffjax.models.bert.layer_outputs`);
    ``teacher_layers``: the teacher's, needed when ``hidden_weight > 0``.
    """
    emb = sentence_embedding(student_layers[-1], mask)
    loss = jnp.mean(1.0 - jnp.sum(emb * target, axis=-1))
    if hidden_weight > 0.0:
        if teacher_layers is None or len(teacher_layers) != len(student_layers):
            raise ValueError("teacher_layers: expected the teacher's output of every layer when hidden_weight > 0")
        weights = mask.astype(jnp.float32)[..., None]
        errors = [jnp.sum(weights * (s.astype(jnp.float32) - t.astype(jnp.float32)) ** 2)
                  / jnp.maximum(jnp.sum(weights * t.astype(jnp.float32) ** 2), 1e-12)
                  for s, t in zip(student_layers, teacher_layers)]
        loss = loss + hidden_weight * jnp.mean(jnp.stack(errors))
    if similarity_weight > 0.0:
        off_diagonal = 1.0 - jnp.eye(emb.shape[0], dtype=jnp.float32)
        gap = (emb @ emb.T - target @ target.T) * off_diagonal
        loss = loss + similarity_weight * jnp.sum(gap ** 2) / jnp.maximum(jnp.sum(off_diagonal), 1.0)
    return loss


def distill_end_to_end(student: Bert, tokenizer, sentences: Sequence[str], teacher_embeddings: np.ndarray,
                       config: DistillConfig, callback: Callable[[int, float], None] | None = None,
                       log_every: int = 20, *, teacher: Bert | None = None) -> tuple[Bert, np.ndarray]:
    """Stage ``d``: Adam (warm-up, cosine decay) on :func:`end_to_end_loss` over random batches of
    ``sentences`` (``teacher_embeddings`` their L2-normalised teacher embeddings, ``(n, H)``), every
    parameter but the embeddings trained, in eval mode (no dropout, the hard routing of inference) with
    the FFF layers in their masked dense form (``"reference"``). ``teacher`` (frozen) gives the layer
    outputs of the hidden-state term; it is required when ``config.e2e_hidden_weight > 0``.
    Returns a trained copy and the ``(steps,)`` loss."""
    if len(sentences) != len(teacher_embeddings):
        raise ValueError(f"teacher_embeddings: expected one row per sentence ({len(sentences)}), "
                         f"got {len(teacher_embeddings)}")
    if config.e2e_hidden_weight > 0.0 and teacher is None:
        raise ValueError("teacher: required when config.e2e_hidden_weight > 0 (its layer outputs are the targets)")
    student = nnx.clone(student)
    student.eval()
    # The masked dense forms train fastest (dense matmuls, the same hard routing); inference switches back.
    ops.set_implementation(student, "fff_v1_hard", "reference")
    ops.set_implementation(student, "fff_v2_hard", "reference")
    ids, mask = tokenizer.encode_longest(list(sentences), config.max_length)
    ids = np.pad(ids, ((0, 0), (0, config.max_length - ids.shape[1])))
    mask = np.pad(mask, ((0, 0), (0, config.max_length - mask.shape[1])))
    graphdef, params, rest = nnx.split(student, nnx.Param, ...)
    use_teacher = config.e2e_hidden_weight > 0.0
    teacher_graphdef, teacher_state = nnx.split(teacher) if use_teacher else (None, None)
    trainable = jax.tree_util.tree_map_with_path(_bert_params_filter, params)
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.e2e_learning_rate, max(1, config.e2e_steps // 10),
                                                  config.e2e_steps)
    optimizer = with_standard_promotion(optax.masked(optax.adam(schedule), trainable))
    opt_state = optimizer.init(params)

    def loss_fn(p, batch_ids, batch_mask, target, teacher_layers):
        model = nnx.merge(graphdef, p, rest)
        return end_to_end_loss(layer_outputs(model, batch_ids, batch_mask), teacher_layers, batch_mask, target,
                               hidden_weight=config.e2e_hidden_weight,
                               similarity_weight=config.e2e_similarity_weight)

    @jax.jit
    def step(p, state, t_state, batch_ids, batch_mask, target):
        teacher_layers = None
        if use_teacher:
            frozen = nnx.merge(teacher_graphdef, t_state)
            teacher_layers = [jax.lax.stop_gradient(h) for h in layer_outputs(frozen, batch_ids, batch_mask)]
        loss, grads = jax.value_and_grad(loss_fn)(p, batch_ids, batch_mask, target, teacher_layers)
        grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    rng = np.random.default_rng(config.seed)
    target = np.asarray(teacher_embeddings, np.float32)
    losses = np.empty(config.e2e_steps, np.float32)
    for i in range(config.e2e_steps):
        rows = rng.choice(len(sentences), config.e2e_batch, replace=False)
        params, opt_state, loss = step(params, opt_state, teacher_state, jnp.asarray(ids[rows]),
                                       jnp.asarray(mask[rows]), jnp.asarray(target[rows]))
        losses[i] = float(loss)
        if callback is not None and (i + 1) % log_every == 0:
            callback(i + 1, float(np.mean(losses[i + 1 - log_every:i + 1])))
    nnx.update(student, params)
    ops.set_implementation(student, "fff_v1_hard", None)
    ops.set_implementation(student, "fff_v2_hard", None)
    return student, losses


def embeddings(model: Bert, tokenizer, sentences: Sequence[str], *, max_length: int | None = None,
               batch_size: int = 64) -> np.ndarray:
    """L2-normalised sentence embeddings ``(n, H)`` (:func:`fffjax.text.embed` of a ``Bert``; texts cut
    at ``max_length`` tokens, by default the tokenizer's and model's limit)."""
    return embed(model, tokenizer, list(sentences), batch_size=batch_size, seq_length=max_length)


@dataclasses.dataclass(frozen=True)
class DistillData:
    """What every conversion of one teacher shares: training and held-out sentences, each layer's
    feedforward inputs (:func:`teacher_layer_inputs`), and the teacher's normalised sentence embeddings
    of both sets (the targets of stage ``d`` and the reference of :func:`measure`)."""

    train_sentences: list[str]
    held_out_sentences: list[str]
    layer_inputs: list[np.ndarray]
    teacher_train: np.ndarray
    teacher_held_out: np.ndarray


def prepare_data(teacher: Bert, tokenizer, train_sentences: Sequence[str], held_out_sentences: Sequence[str], *,
                 layer_tokens: int, max_length: int = 64, seed: int = 0) -> DistillData:
    """The teacher's side of every conversion, computed once (:class:`DistillData`)."""
    if not train_sentences or len(held_out_sentences) < 11:
        raise ValueError(f"train_sentences, held_out_sentences: expected some training sentences and at least 11 "
                         f"held-out ones, got {len(train_sentences)} and {len(held_out_sentences)}")
    return DistillData(
        list(train_sentences), list(held_out_sentences),
        teacher_layer_inputs(teacher, tokenizer, train_sentences, n_tokens=layer_tokens, max_length=max_length,
                             seed=seed),
        embeddings(teacher, tokenizer, train_sentences, max_length=max_length),
        embeddings(teacher, tokenizer, held_out_sentences))


def measure(student: Bert, tokenizer, sentences: Sequence[str], teacher_embeddings: np.ndarray
            ) -> dict[str, float]:
    """The student against the teacher on ``sentences`` (the teacher's normalised embeddings of them,
    ``(n, H)``): mean cosine, Spearman of pairwise similarities, nearest-neighbour agreement at 1 and 10
    (:mod:`fffjax.similarity`)."""
    from fffjax import similarity

    e = embeddings(student, tokenizer, sentences)
    t = teacher_embeddings
    return {"cosine": similarity.mean_cosine(e, t), "spearman": similarity.similarity_spearman(e, t),
            "neighbours_at_1": similarity.neighbour_agreement(e, t, 1),
            "neighbours_at_10": similarity.neighbour_agreement(e, t, 10)}


def run(teacher: Bert, tokenizer, data: DistillData, config: DistillConfig,
        progress: Callable[[str], None] | None = None) -> tuple[Bert, dict[str, Any]]:
    """Every stage of ``config`` on ``teacher``, the student measured after each.

    Returns the last student and a JSON-able report: the config, the spec, active and total
    feedforward neurons per layer, and per stage the held-out measures (:func:`measure`), each layer's
    relative error against its dense layer on its training inputs, the loss curves (stages c, d;
    every 10th step) and the seconds the stage took.
    """
    import time

    say = progress or (lambda message: None)
    width = teacher.config.intermediate_size
    spec = dense_to_fff.spec_for_fraction(config.kind, width, config.fraction)
    report: dict[str, Any] = {"config": dataclasses.asdict(config), "spec": spec, "dense_width": width,
                              "active_neurons": dense_to_fff.active_neurons(spec), "stages": {}}
    start = time.perf_counter()
    student = teacher
    for result in convert_bert(teacher, data.layer_inputs, config, progress=say):
        student = result.student
        entry = {"seconds": time.perf_counter() - start, "layer_errors": result.layer_errors,
                 **measure(student, tokenizer, data.held_out_sentences, data.teacher_held_out)}
        if result.loss_curves is not None:
            entry["loss_curves"] = [curve[::10].tolist() for curve in result.loss_curves]
        report["stages"][result.stage] = entry
        say(f"stage {result.stage}: spearman {entry['spearman']:.4f} cosine {entry['cosine']:.4f}")
        start = time.perf_counter()
    if "d" in config.stages():
        student, losses = distill_end_to_end(
            student, tokenizer, data.train_sentences, data.teacher_train, config,
            callback=lambda step, loss: say(f"stage d: step {step}/{config.e2e_steps} loss {loss:.4f}"),
            teacher=teacher)
        report["stages"]["d"] = {"seconds": time.perf_counter() - start, "loss_curve": losses[::10].tolist(),
                                 **measure(student, tokenizer, data.held_out_sentences, data.teacher_held_out)}
        say(f"stage d: spearman {report['stages']['d']['spearman']:.4f}")
    return student, report
