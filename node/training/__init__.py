"""Training: the model, this node's data, its local steps, and each module's DiLoCo state.

- model     byte-level mixture-of-experts transformer; module/expert split
- experts   the hosted experts' feed-forward on tokens grouped by expert, in fixed-size buffers
- data      streams the user's text files (or the default corpus) with a held-out split
- formats   the formats --data reads (compressed, JSON Lines, Parquet, Arrow), each as a text stream
- trainer   inner AdamW steps, evaluation and sampling; what a custom model must offer (SwarmModel)
- sampling  the sampling loop every byte-level model shares (from its next-byte logits)
- diloco    per-module global copy and outer Nesterov step; their tensors in a checkpoint
"""

from typing import TYPE_CHECKING

from node._lazy import lazy_exports

if TYPE_CHECKING:  # the surface, imported on first use (node/_lazy.py)
    from node.training.data import DataError as DataError
    from node.training.data import TextData as TextData
    from node.training.diloco import ModuleState as ModuleState
    from node.training.diloco import capture_modules as capture_modules
    from node.training.diloco import check_fits as check_fits
    from node.training.diloco import restore_modules as restore_modules
    from node.training.diloco import state_hash as state_hash
    from node.training.model import MoETransformer as MoETransformer
    from node.training.trainer import EvalCadence as EvalCadence
    from node.training.trainer import ModelFactory as ModelFactory
    from node.training.trainer import SwarmModel as SwarmModel
    from node.training.trainer import Trainer as Trainer
    from node.training.trainer import architecture_swarm_id as architecture_swarm_id
    from node.training.trainer import resolve_device as resolve_device
else:
    __getattr__, __all__ = lazy_exports(__name__, __file__)
