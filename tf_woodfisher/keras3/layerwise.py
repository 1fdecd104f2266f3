"""Post-training OBS from activations for Keras 3 models: ``tfw3.one_shot_prune(method='obc' | 'sparsegpt')``.

The Keras 3 side of :mod:`tf_woodfisher.keras_layerwise`, the implementation both adapters share (the tf_keras
path gives the same masks and weights on the same model): here only the
:class:`~tf_woodfisher.keras_layerwise.KernelTable` of Keras 3 (its layer classes, the ``tf.Variable`` behind
each ``keras.Variable``, sublayers such as MultiHeadAttention's EinsumDense, the model's input rank).

Kernels reconstructed: Dense, EinsumDense (MultiHeadAttention's four included), Conv1D/2D/3D, DepthwiseConv1D/2D,
SeparableConv1D/2D (both kernels). Other prunable layers (Embedding, RNNs, transposed convolutions) stay dense
with a warning, or are refused with an error naming them when selected with ``layers=``.
"""
from __future__ import annotations

from typing import Sequence

import keras

from tf_woodfisher import compat
from tf_woodfisher import keras_layerwise as shared
from tf_woodfisher.config import WoodFisherConfig
from tf_woodfisher.keras3.targets import as_tf_variable, input_rank
from tf_woodfisher.keras_layerwise import KernelTable
from tf_woodfisher.pruning.report import PruningReport
from tf_woodfisher.pruning.targets import PruningTarget

TABLE = KernelTable(keras.layers, input_rank, as_variable=as_tf_variable, sublayers=compat.keras3_sublayers)


def find_kernels(targets: Sequence[PruningTarget], method: str, explicit: bool) -> list:
    """The kernels of ``targets`` (from :func:`~tf_woodfisher.keras3.find_prunable_weights`) the layer-wise
    ``method`` can prune (:meth:`~tf_woodfisher.keras_layerwise.KernelTable.find_kernels`)."""
    return TABLE.find_kernels(targets, method, explicit)


def layerwise_prune(model, targets: Sequence[PruningTarget], dataset, config: WoodFisherConfig,
                    target_sparsity: float, **options) -> PruningReport:
    """Prune ``targets`` of a Keras 3 ``model`` (the model to forward: a ``PrunedModel``'s inner model) in place by
    layer-wise OBS reconstruction: :func:`tf_woodfisher.keras_layerwise.layerwise_prune` with Keras 3's table
    (``options``: its keywords ``explicit``, ``verbose``, ``started``, ``unpruned``, ``progbar``)."""
    return shared.layerwise_prune(model, targets, dataset, config, target_sparsity, table=TABLE, **options)
