"""PyTorch interop: FFF layers, UltraFastBERT, the causal decoder and the BERT encoder to and from PyTorch state
dicts, and file I/O;
``dense_to_fff``: a dense GELU feedforward converted into FFF-v1 or FFF-v2 (init, fitted routing, distillation).

Torch, safetensors and fastfeedforward are optional (the ``torch`` extra) and imported only
inside the functions that need them.
"""

from fffjax.convert import dense_to_fff
from fffjax.convert.bert import export_bert, import_bert
from fffjax.convert.decoder import export_decoder, import_decoder
from fffjax.convert.io import load, save, to_numpy, to_numpy_dict
from fffjax.convert.layers import (
    export_fastfeedforward,
    export_ultrafast_ff,
    import_fastfeedforward,
    import_ultrafast_ff,
)
from fffjax.convert.ultrafastbert import export_ultrafastbert, import_ultrafastbert

__all__ = [
    "dense_to_fff",
    "export_bert",
    "export_decoder",
    "export_fastfeedforward",
    "export_ultrafast_ff",
    "export_ultrafastbert",
    "import_bert",
    "import_decoder",
    "import_fastfeedforward",
    "import_ultrafast_ff",
    "import_ultrafastbert",
    "load",
    "save",
    "to_numpy",
    "to_numpy_dict",
]
