"""Post-training OBS from activations for tf_keras models: ``one_shot_prune(method='obc' | 'sparsegpt')``.

The tf_keras side of :mod:`tf_woodfisher.keras_layerwise`, which holds the method (calibration, Hessians,
the dense reconstruction target, ``mode='global'``'s allocation, N:M, the report's relative reconstruction
errors) for both adapters: here only the :class:`~tf_woodfisher.keras_layerwise.KernelTable` of tf_keras
(its layer classes, tfmot's wrappers unwrapped, sublayers such as MultiHeadAttention's EinsumDense found
through ``submodules``, the model's input ranks).
"""
from __future__ import annotations

from typing import Sequence

import tf_keras as keras

from tf_woodfisher import keras_layerwise as shared
from tf_woodfisher.config import WoodFisherConfig
from tf_woodfisher.keras_layerwise import (CALIBRATION_BATCH, CURVE_POINTS, SPARSEGPT_BLOCK,  # noqa: F401
                                           SPARSEGPT_GRID, UNSUPPORTED, KernelTable, _ConvKernel, _DenseKernel,
                                           _DepthwiseKernel, _EinsumKernel, _Kernel, _PointwiseKernel, _depthwise)
from tf_woodfisher.pruning.report import PruningReport
from tf_woodfisher.pruning.targets import PruningTarget
from tf_woodfisher.tfmot.problem import input_rank
from tf_woodfisher.tfmot.targets import is_pruning_wrapper

TABLE = KernelTable(keras.layers, input_rank,
                    sublayers=lambda layer: [layer, *getattr(layer, "submodules", ())],
                    owner=lambda owner: owner.layer if is_pruning_wrapper(owner) else owner)


def find_kernels(targets: Sequence[PruningTarget], method: str, explicit: bool) -> list:
    """The kernels of ``targets`` (from :func:`~tf_woodfisher.tfmot.find_prunable_weights`) the layer-wise
    ``method`` can prune (:meth:`~tf_woodfisher.keras_layerwise.KernelTable.find_kernels`)."""
    return TABLE.find_kernels(targets, method, explicit)


def layerwise_prune(model, targets: Sequence[PruningTarget], dataset, config: WoodFisherConfig,
                    target_sparsity: float, **options) -> PruningReport:
    """Prune ``targets`` of a tf_keras ``model`` (plain or wrapped by tfmot) in place by layer-wise OBS
    reconstruction: :func:`tf_woodfisher.keras_layerwise.layerwise_prune` with tf_keras' table (``options``:
    its keywords ``explicit``, ``verbose``, ``started``, ``unpruned``, ``progbar``)."""
    return shared.layerwise_prune(model, targets, dataset, config, target_sparsity, table=TABLE, **options)
