"""The numerical core: per-sample gradients, block partitions and the inverse empirical Fisher.

Imports no Keras, tf_keras or tfmot: it works on variables, callables and tensors.
"""
from tf_woodfisher.fisher.blocks import BlockPartition  # noqa: F401
from tf_woodfisher.fisher.woodbury import CholeskyError, InverseFisher  # noqa: F401
