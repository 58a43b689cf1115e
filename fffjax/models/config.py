"""Crammed-BERT / UltraFastBERT model configurations: a frozen dataclass, named presets, and the
published ``arch`` block (``config.json`` of ``pbelcak/UltraFastBERT-1x11-long``) both ways.

``ModelConfig`` holds only what changes the weights or the forward pass; everything the published
architecture fixes (pre-LN, scaled-sinusoidal positions, per-head interleaved QKV without bias,
exact GELU, tied decoder without bias, average pooling with a Tanh dense head) is built in, and
:meth:`ModelConfig.from_arch` refuses an ``arch`` block that asks for anything else.
"""

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fffjax import tree

FFN_TYPES = ("fff", "dense")


def check_transformer_fields(config) -> None:
    """The checks every transformer config of fffjax shares (encoder and decoder): heads divide an even
    ``hidden_size``, ``dropout`` in [0, 1), positive ``norm_eps`` and ``init_std``, ``pad_token_id`` a
    valid id. Raises ``ValueError`` naming the field."""
    if config.hidden_size % config.num_heads:
        raise ValueError(
            f"hidden_size ({config.hidden_size}) must be divisible by num_heads ({config.num_heads})")
    if config.hidden_size % 2:
        raise ValueError(f"hidden_size must be even (interleaved sin/cos positions), got {config.hidden_size}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {config.dropout!r}")
    if not config.norm_eps > 0:
        raise ValueError(f"norm_eps must be > 0, got {config.norm_eps!r}")
    if not config.init_std > 0:
        raise ValueError(f"init_std must be > 0, got {config.init_std!r}")
    if not isinstance(config.pad_token_id, int) or not 0 <= config.pad_token_id < config.vocab_size:
        raise ValueError(f"pad_token_id must be an int in [0, vocab_size={config.vocab_size}), "
                         f"got {config.pad_token_id!r}")


class TransformerShape:
    """What the encoder's and the decoder's configs derive from ``hidden_size``, ``num_heads``,
    ``fff_depth`` and ``fff_trees``."""

    @property
    def attention_head_width(self) -> int:
        """Width of one attention head, H / num_heads (64 for base)."""
        return self.hidden_size // self.num_heads

    @property
    def norm_factor(self) -> float:
        """Attention score scale ``1 / sqrt(head width)`` (the published ``norm_factor`` buffer)."""
        return 1.0 / math.sqrt(self.attention_head_width)

    @property
    def fff_nodes(self) -> int:
        """Neurons of all FFF trees, ``K * (2**(D+1) - 1)`` (4095 for base)."""
        return self.fff_trees * tree.v2_nodes_per_tree(self.fff_depth)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(TransformerShape):
    """Shape and regularisation of a crammed-BERT encoder with an FFF-v2 or dense feedforward.

    Attributes:
        vocab_size: word-piece vocabulary size V (embedding rows, decoder outputs).
        hidden_size: model width H.
        num_layers: transformer layers.
        num_heads: attention heads; H must be divisible by it (head width H / num_heads).
        max_seq_length: rows of the sinusoidal position table; longer inputs are refused.
        ffn: ``"fff"`` (UltraFastBERT's FFF-v2) or ``"dense"`` (crammed BERT's feedforward).
        fff_depth: descents per FFF tree D (``2**(D+1) - 1`` neurons per tree); FFF only.
        fff_trees: independent FFF trees K (the published ``intermed_size``); FFF only.
        dense_width: hidden width of the dense feedforward; dense only.
        norm_eps: LayerNorm epsilon (1e-12 as published; Flax's default is 1e-6).
        dropout: one rate for embedding, attention, residual and classifier dropout (0.1 published).
        pad_token_id: id whose embedding row starts at zero and receives no embedding gradient.
        num_labels: classifier outputs (1 = regression); used only by the classifier.
        head_dim: width of the classifier's pooler dense layer (1024 published).
        init_std: standard deviation of the normal init of every linear and the embedding.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    max_seq_length: int
    ffn: str
    fff_depth: int = 11
    fff_trees: int = 1
    dense_width: int = 3072
    norm_eps: float = 1e-12
    dropout: float = 0.1
    pad_token_id: int = 0
    num_labels: int = 2
    head_dim: int = 1024
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_length",
                     "fff_trees", "dense_width", "num_labels", "head_dim"):
            tree.check_count(getattr(self, name), name, 1)
        tree.check_depth(self.fff_depth, "fff_depth")
        if self.ffn not in FFN_TYPES:
            raise ValueError(f"ffn must be one of {FFN_TYPES}, got {self.ffn!r}")
        check_transformer_fields(self)

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`; an unknown key raises ``ValueError`` naming it."""
        if not isinstance(d, Mapping):
            raise TypeError(f"d must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ published arch block

    def to_arch(self) -> dict[str, Any]:
        """The ``arch`` block of the published ``config.json`` (crammed BERT's resolved hydra config).

        The keys and fixed values are those of ``cramming/config/arch/crammed-bert-fff.yaml`` as
        resolved into ``UltraFastBERT-1x11-long/config.json``; the dense twin uses
        ``intermed_type "ff"`` with ``intermed_size = dense_width`` (crammed BERT's ``FFNComponent``).
        """
        if self.ffn == "fff":
            ffn = {"intermed_type": "fff", "intermed_size": self.fff_trees, "intermed_depth": self.fff_depth}
        else:
            ffn = {"intermed_type": "ff", "intermed_size": self.dense_width}
        return {
            "architectures": ["ScriptableCrammedBERT"],
            "num_transformer_layers": self.num_layers,
            **ffn,
            "hidden_size": self.hidden_size,
            "hidden_dropout_prob": self.dropout,
            "norm": "LayerNorm",
            "norm_eps": self.norm_eps,
            "norm_scheme": "pre",
            "nonlin": "GELU",
            "tie_weights": True,
            "decoder_bias": False,
            "sparse_prediction": 0.25,
            "loss": "cross-entropy",
            "objective_layout": "MLM",
            "embedding": {
                "vocab_size": self.vocab_size,
                "pos_embedding": "scaled-sinusoidal",
                "dropout_prob": self.dropout,
                "pad_token_id": self.pad_token_id,
                "max_seq_length": self.max_seq_length,
                "embedding_dim": self.hidden_size,
                "normalization": True,
                "stable_low_precision": False,
            },
            "attention": {
                "type": "self-attention",
                "causal_attention": False,
                "num_attention_heads": self.num_heads,
                "dropout_prob": self.dropout,
                "skip_output_projection": False,
                "qkv_bias": False,
                "rotary_embedding": False,
                "seq_op_in_fp32": False,
                "sequence_op": "torch-softmax",
            },
            "init": {"type": "normal", "std": self.init_std},
            "ffn_layer_frequency": 1,
            "skip_head_transform": True,
            "use_bias": False,
            "final_norm": True,
            "num_labels": self.num_labels,
            "classification_head": {
                "pooler": "avg",
                "include_ff_layer": True,
                "head_dim": self.head_dim,
                "nonlin": "Tanh",
                "classifier_dropout": self.dropout,
            },
        }

    @classmethod
    def from_arch(cls, arch: Mapping[str, Any]) -> "ModelConfig":
        """A config from the published ``arch`` block (or a whole ``config.json`` dict holding one).

        Raises ``ValueError`` naming the key when the block asks for an architecture fffjax does
        not build (another norm, position embedding, nonlinearity, biases, causal attention, ...).
        A missing ``num_labels`` (the MLM checkpoints store ``null``) gives the default 2.
        """
        if not isinstance(arch, Mapping):
            raise TypeError(f"arch must be a mapping, got {type(arch).__name__}")
        if "arch" in arch and isinstance(arch["arch"], Mapping):
            arch = arch["arch"]
        embedding = _section(arch, "embedding")
        attention = _section(arch, "attention")
        head = arch.get("classification_head") or {}
        init = arch.get("init") or {}

        expected = [
            ("norm", arch, "LayerNorm"), ("norm_scheme", arch, "pre"), ("nonlin", arch, "GELU"),
            ("tie_weights", arch, True), ("decoder_bias", arch, False), ("skip_head_transform", arch, True),
            ("use_bias", arch, False), ("final_norm", arch, True), ("ffn_layer_frequency", arch, 1),
            ("embedding.pos_embedding", embedding, "scaled-sinusoidal"),
            ("embedding.normalization", embedding, True),
            ("attention.type", attention, "self-attention"), ("attention.causal_attention", attention, False),
            ("attention.skip_output_projection", attention, False), ("attention.qkv_bias", attention, False),
            ("attention.rotary_embedding", attention, False),
            ("classification_head.pooler", head, "avg"), ("classification_head.include_ff_layer", head, True),
            ("classification_head.nonlin", head, "Tanh"), ("init.type", init, "normal"),
        ]
        for dotted, section, value in expected:
            key = dotted.rsplit(".", 1)[-1]
            if key in section and section[key] is not None and section[key] != value:
                raise ValueError(f"arch[{dotted!r}] = {section[key]!r} is not supported (fffjax builds {value!r})")
        sequence_op = attention.get("sequence_op")
        if sequence_op not in (None, "torch-softmax"):
            raise ValueError(f"arch['attention.sequence_op'] = {sequence_op!r} is not supported "
                             "(fffjax builds softmax)")

        hidden = _int(arch, "hidden_size")
        embedding_dim = embedding.get("embedding_dim", hidden)
        if isinstance(embedding_dim, int) and embedding_dim != hidden:
            raise ValueError(f"arch['embedding.embedding_dim'] = {embedding_dim} must equal hidden_size = {hidden}")

        intermed_type = arch.get("intermed_type", "ff")
        if intermed_type == "fff":
            ffn = {"ffn": "fff", "fff_trees": _int(arch, "intermed_size"), "fff_depth": _int(arch, "intermed_depth")}
        elif intermed_type == "ff":
            ffn = {"ffn": "dense", "dense_width": _int(arch, "intermed_size")}
        else:
            raise ValueError(f"arch['intermed_type'] = {intermed_type!r} is not supported ('fff' or 'ff')")

        optional = {}
        if isinstance(arch.get("hidden_dropout_prob"), (int, float)):
            optional["dropout"] = float(arch["hidden_dropout_prob"])
        if arch.get("norm_eps") is not None:
            optional["norm_eps"] = float(arch["norm_eps"])
        if embedding.get("pad_token_id") is not None:
            optional["pad_token_id"] = int(embedding["pad_token_id"])
        if arch.get("num_labels") is not None:
            optional["num_labels"] = int(arch["num_labels"])
        if head.get("head_dim") is not None:
            optional["head_dim"] = int(head["head_dim"])
        if init.get("std") is not None:
            optional["init_std"] = float(init["std"])
        vocab = embedding.get("vocab_size")
        if vocab is None:
            raise ValueError("arch['embedding.vocab_size'] is missing (the published config.json fills it in)")
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            num_layers=_int(arch, "num_transformer_layers"),
            num_heads=_int(attention, "num_attention_heads", "attention."),
            max_seq_length=_int(embedding, "max_seq_length", "embedding."),
            **ffn,
            **optional,
        )


def _section(arch: Mapping, name: str) -> Mapping:
    section = arch.get(name)
    if not isinstance(section, Mapping):
        raise ValueError(f"arch[{name!r}] must be a mapping, got {section!r}")
    return section


def _int(section: Mapping, key: str, prefix: str = "") -> int:
    if key not in section or section[key] is None:
        raise ValueError(f"arch[{prefix + key!r}] is missing")
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"arch[{prefix + key!r}] must be an int, got {value!r}")
    return int(value)


# The tiny pair trains on 2 CPU cores in minutes. Its FFF (depth 7: 255 neurons, 8 per token) has
# about the parameters of its dense twin (width 256 = 4 H, crammed BERT's ratio), mirroring base
# (4095 neurons against 3072).
_TINY = dict(vocab_size=4096, hidden_size=64, num_layers=2, num_heads=2, max_seq_length=128, head_dim=128)
_BASE = dict(vocab_size=32768, hidden_size=768, num_layers=16, num_heads=12, max_seq_length=128)

CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(**_TINY, ffn="fff", fff_depth=7, fff_trees=1),
    "tiny-dense": ModelConfig(**_TINY, ffn="dense", dense_width=256),
    # UltraFastBERT-1x11-long: one tree of depth 11 (4095 neurons, 12 per token).
    "base": ModelConfig(**_BASE, ffn="fff", fff_depth=11, fff_trees=1),
    # Its dense twin: crammed BERT's feedforward of width 3072.
    "base-dense": ModelConfig(**_BASE, ffn="dense", dense_width=3072),
}


def get_config(name_or_path: "str | Path") -> ModelConfig:
    """A preset by name (``tiny``, ``tiny-dense``, ``base``, ``base-dense``) or a JSON file.

    The file may hold :meth:`ModelConfig.to_dict` output, a published ``config.json`` (with an
    ``arch`` block) or a bare ``arch`` block.
    """
    if isinstance(name_or_path, str) and name_or_path in CONFIGS:
        return CONFIGS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"config {str(name_or_path)!r} is neither a preset {sorted(CONFIGS)} nor a JSON file")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    if "arch" in data or "num_transformer_layers" in data:
        return ModelConfig.from_arch(data)
    return ModelConfig.from_dict(data)
