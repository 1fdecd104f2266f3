"""``WoodFisherConfig``: every knob of a pruning event, in one frozen object validated once.

Every entry point (``one_shot_prune``, ``prune_woodfisher``, ``UpdatePruningStep`` and the Keras 3
equivalents) takes ``config=`` and keyword overrides of its fields, resolved by :func:`resolve_config`.
This module imports neither TensorFlow nor Keras.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from typing import Any, Mapping

METHODS = ("magnitude", "diagonal_fisher", "woodfisher", "woodtaylor", "obc", "sparsegpt")
LAYERWISE_METHODS = ("obc", "sparsegpt")  # post-training reconstruction from activations: no labels, no gradients
RECONSTRUCTION_TARGETS = ("dense", "inputs")
MODES = ("global", "layerwise")
FISHER_BLOCK_ORDERS = ("flat", "filter")
INVERSE_METHODS = ("woodfisher", "woodtaylor")  # those that factorise the inverse Fisher
GRADIENT_DTYPES = ("float32", "float16", "bfloat16")
INVERSE_DTYPES = ("float32", "float64")
POOLING_TYPES = ("AVG", "MAX")
DEFAULT_SHUFFLE_BUFFER = 10_000

# Old keyword names: accepted where their meaning is unambiguous, refused (with the new name) where not.
ALIASES = {"num_samples": "num_gradients"}
RENAMED = {
    "dtype": "inverse_dtype='float32' or 'float64' (the dtype of the inverse Fisher)",
    "recompute_steps": "steps=k (Fisher recomputations per pruning event)",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate_sparsity(value: Any, what: str = "target_sparsity") -> float:
    """``value`` as a float in [0, 1) (numpy scalars accepted).

    Args:
        value: the sparsity, a fraction of zeros (Python or numpy real number; bools refused).
        what: the parameter's name, for the error message.

    Returns:
        ``value`` as a Python float in [0, 1).

    Raises:
        ValueError: naming ``what`` when ``value`` is not a number in [0, 1).
    """
    if not (_is_number(value) and 0.0 <= float(value) < 1.0):
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WoodFisherConfig:
    """How a pruning event computes scores, masks and weight updates. Keyword-only, frozen, validated once.

    Args:
        method: ``'magnitude'`` (F = I), ``'diagonal_fisher'`` (score ½w²F_qq), ``'woodfisher'`` (OBS
            score w²/(2[F⁻¹]_qq) and update δw = −F⁻¹u), ``'woodtaylor'`` (adds the gradient term), or the
            layer-wise reconstruction methods ``'obc'`` (exact greedy OBS per output row) and ``'sparsegpt'``
            on H = 2XXᵀ/n of each layer's calibration inputs (:mod:`tf_woodfisher.tfmot.layerwise`; no labels,
            no gradients: the Fisher fields, ``damping`` and ``steps`` do not apply to them).
        mode: ``'global'`` (one threshold over all pruned weights) or ``'layerwise'`` (each tensor at the target).
        num_gradients: number m of gradients in the empirical Fisher F = λI + (1/m)Σgᵢgᵢᵀ
            (old name ``num_samples``, still accepted as a keyword).
        fisher_batch_size: samples averaged into each gradient (the paper's fisher mini-batch); the event
            reads num_gradients × fisher_batch_size samples.
        fisher_block_size: the Fisher's diagonal blocks: ``None`` (one block per weight tensor), an int c
            (chunks of c weights, never crossing tensors) or ``'model'`` (one block).
        fisher_block_order: how an int ``fisher_block_size`` cuts a tensor. ``'flat'``: chunks of c consecutive
            entries in the weight's own (row-major) order; a Keras kernel's last axis is its output channel, so a
            chunk of a convolution's (kh, kw, c_in, c_out) kernel spans c / c_out input positions of every filter.
            ``'filter'``: chunks of whole output units (slices along the last axis: a convolution's filter, a
            Dense unit's column), max(1, c // s) of them for units of s weights, as the WoodFisher authors'
            chunks of PyTorch's (c_out, c_in, kh, kw) kernels hold whole filters; a unit larger than c is one
            block of s weights (a warning says so). Needs an int ``fisher_block_size`` and single-weight masks.
        damping: λ > 0, the dampening added to the Fisher's diagonal.
        steps: Fisher recomputations per pruning event: the event reaches its sparsity in ``steps`` steps,
            each removing the same fraction of the remaining weights after recomputing the gradients.
        update: apply the OBS weight update (else only zero the pruned weights).
        inverse_dtype: ``'float32'`` or ``'float64'``, the dtype the inverse is factorised in.
        gradient_dtype: ``'float32'``, ``'bfloat16'`` or ``'float16'``: storage of the m × d gradients.
        max_memory: bytes (int) or a string such as ``'4GB'`` the event's large buffers may take;
            ``None``: half of the memory available when the event is planned.
        shuffle_buffer: samples in the shuffle buffer of the Fisher data (0: read in order).
        seed: base seed of the Fisher samples; each event and step mixes its indices into it.
        block_size: tfmot's sparsity block shape (r, c): 2-D weights are pruned in whole r × c blocks
            (shorter at the edges), scored as groups (see :mod:`tf_woodfisher.pruning.structures`);
            ``(1, 1)``: single weights.
        block_pooling_type: tfmot's pooling of a block's per-weight scores for magnitude and diagonal
            Fisher, ``'AVG'`` or ``'MAX'`` (the OBS methods score a block jointly and warn that it is unused).
        sparsity_m_by_n: tfmot's N:M pattern (n, m): n **zeros** in every m consecutive weights along the
            input-channel axis (tfmot's meaning: (2, 4) removes 2 of every 4), for 2-D and 4-D weights; it
            fixes the sparsity at n/m. ``None``: no N:M pattern. Not combined with ``block_size``.
        calibration_samples: ``obc``/``sparsegpt``: unlabelled inputs forwarded to build each layer's
            H = 2XXᵀ/n (labels in the dataset are ignored): the first ``calibration_samples`` of the
            dataset, in its order (``seed`` draws nothing there: shuffle the dataset for another subset).
        percdamp: ``obc``/``sparsegpt``: damping of H as a fraction of mean(diag H) (SparseGPT's percdamp);
            0 refuses a singular H (fewer input rows than the layer's input dimension) instead of damping it.
        reconstruction_target: ``obc``/``sparsegpt``: what each layer's pruned weights Ŵ reproduce on its inputs
            X̃ (which come from the layers pruned before it): ``'dense'`` the dense model's outputs XWᵀ of that
            layer, correcting the upstream error (min ‖X̃Ŵᵀ − XWᵀ‖²); ``'inputs'`` its own dense weights on
            the same inputs, as OBC and SparseGPT do (min ‖X̃(W − Ŵ)ᵀ‖²).
        sequential: ``woodfisher`` with an int ``fisher_block_size``: remove weights one at a time inside each
            explicit Fisher block with exact OBS updates and rank-1 downdates of the block inverse, the block of
            the next removal chosen globally by least loss increase (:func:`tf_woodfisher.pruning.obs.sequential_obs`).
        diagnostics: the Fisher methods and magnitude: report, per event, the loss increase the quadratic model
            predicts for the weight change applied, ḡᵀδw + ½δwᵀFδw and ½δwᵀFδw alone, against the change of the
            mean loss measured on the event's Fisher samples (:class:`~tf_woodfisher.pruning.report.LossDiagnostics`;
            magnitude then reads Fisher gradients too). Costs two forward passes over the Fisher samples per event
            and keeps its m × d gradients until the update; not under a multi-replica ``tf.distribute`` strategy
            nor with a memory plan that streams or recomputes the gradients (both refused with an error).

    Raises:
        ValueError: a field of the wrong type or out of range; the message names the field.
    """

    method: str = "woodfisher"
    mode: str = "global"
    num_gradients: int = 1000
    fisher_batch_size: int = 1
    fisher_block_size: int | str | None = None
    fisher_block_order: str = "flat"
    damping: float = 1e-5
    steps: int = 1
    update: bool = True
    inverse_dtype: str = "float32"
    gradient_dtype: str = "float32"
    max_memory: int | float | str | None = None
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    seed: int = 0
    block_size: tuple[int, int] = (1, 1)
    block_pooling_type: str = "AVG"
    sparsity_m_by_n: tuple[int, int] | None = None
    calibration_samples: int = 512
    percdamp: float = 0.01
    reconstruction_target: str = "dense"
    sequential: bool = False
    diagnostics: bool = False

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen)
        _choice("method", self.method, METHODS)
        _choice("mode", self.mode, MODES)
        for name in ("num_gradients", "fisher_batch_size", "steps"):
            set_(name, _positive_int(name, getattr(self, name)))
        for name in ("shuffle_buffer", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise _error(name, value, "an int ≥ 0")
            set_(name, int(value))
        if self.fisher_block_size is not None and self.fisher_block_size != "model":
            set_("fisher_block_size", _positive_int("fisher_block_size", self.fisher_block_size,
                                                    "None, 'model' or an int ≥ 1"))
        _choice("fisher_block_order", self.fisher_block_order, FISHER_BLOCK_ORDERS)
        if not (_is_number(self.damping) and math.isfinite(self.damping) and self.damping > 0):
            raise _error("damping", self.damping, "a finite number > 0")
        set_("damping", float(self.damping))
        if not isinstance(self.update, bool):
            raise _error("update", self.update, "True or False")
        _choice("inverse_dtype", self.inverse_dtype, INVERSE_DTYPES)
        _choice("gradient_dtype", self.gradient_dtype, GRADIENT_DTYPES)
        if self.max_memory is not None:
            from tf_woodfisher.fisher.memory import parse_bytes  # the one parser of byte sizes

            parse_bytes(self.max_memory)
        set_("block_size", _int_pair("block_size", self.block_size))
        _choice("block_pooling_type", self.block_pooling_type, POOLING_TYPES)
        if self.sparsity_m_by_n is not None:
            n, m = _int_pair("sparsity_m_by_n", self.sparsity_m_by_n)
            if n >= m:
                raise _error("sparsity_m_by_n", self.sparsity_m_by_n, "(n, m) with 0 < n < m")
            set_("sparsity_m_by_n", (n, m))
            if self.block_size != (1, 1):
                raise ValueError(f"block_size={self.block_size} and sparsity_m_by_n={(n, m)} were both given: tfmot "
                                 "would silently ignore block_size; give one of them")
        set_("calibration_samples", _positive_int("calibration_samples", self.calibration_samples))
        if not (_is_number(self.percdamp) and math.isfinite(self.percdamp) and self.percdamp >= 0):
            raise _error("percdamp", self.percdamp, "a finite number ≥ 0 (a fraction of mean(diag H))")
        set_("percdamp", float(self.percdamp))
        _choice("reconstruction_target", self.reconstruction_target, RECONSTRUCTION_TARGETS)
        if not isinstance(self.sequential, bool):
            raise _error("sequential", self.sequential, "True or False")
        if self.sequential and (self.method != "woodfisher" or not _is_int(self.fisher_block_size) or not self.update):
            raise ValueError(f"sequential=True is sequential OBS inside explicit Fisher blocks: it needs "
                             f"method='woodfisher', an int fisher_block_size and update=True (got "
                             f"method={self.method!r}, fisher_block_size={self.fisher_block_size!r}, "
                             f"update={self.update})")
        if self.fisher_block_order == "filter" and (not _is_int(self.fisher_block_size) or self.structured):
            raise ValueError(f"fisher_block_order='filter' cuts int fisher_block_size chunks along output units: it "
                             f"needs an int fisher_block_size (got {self.fisher_block_size!r}; None and 'model' "
                             f"blocks hold whole tensors already) and no block_size / sparsity_m_by_n structure "
                             f"(whose groups set the chunks; got block_size={self.block_size}, "
                             f"sparsity_m_by_n={self.sparsity_m_by_n})")
        if self.sequential and self.structured:
            raise ValueError("sequential=True removes single weights: it cannot be combined with block_size or "
                             "sparsity_m_by_n")
        if not isinstance(self.diagnostics, bool):
            raise _error("diagnostics", self.diagnostics, "True or False")
        if self.diagnostics and self.method in LAYERWISE_METHODS:
            raise ValueError(f"diagnostics=True compares the Fisher model's predicted loss with the measured one; "
                             f"method {self.method!r} has no Fisher (its report gives each layer's reconstruction "
                             "error instead)")
        if self.method in LAYERWISE_METHODS:
            if self.steps != 1 or not self.update:
                raise ValueError(f"method {self.method!r} prunes each layer once with its own reconstruction update: "
                                 f"steps must be 1 and update True (got steps={self.steps}, update={self.update})")
            if self.block_size != (1, 1):
                raise ValueError(f"method {self.method!r} prunes single weights or N:M groups (sparsity_m_by_n); "
                                 f"block_size={self.block_size} is not supported by it")
        if self.needs_inverse and self.num_gradients == 1:
            warnings.warn("num_gradients=1: the Fisher has rank one, so WoodFisher scores are barely better than "
                          "magnitude; use tens to thousands of gradients", RuntimeWarning, stacklevel=4)

    @property
    def needs_gradients(self) -> bool:
        """Whether the method reads Fisher gradients (all but magnitude and the layer-wise methods; magnitude
        with ``diagnostics=True`` too, for the diagnostics only)."""
        return self.method not in ("magnitude",) + LAYERWISE_METHODS or (self.method == "magnitude"
                                                                       and self.diagnostics)

    @property
    def needs_inverse(self) -> bool:
        """Whether the method factorises the inverse Fisher (WoodFisher, WoodTaylor)."""
        return self.method in INVERSE_METHODS

    @property
    def structured(self) -> bool:
        """Whether masks follow a block or N:M structure instead of single weights."""
        return self.block_size != (1, 1) or self.sparsity_m_by_n is not None

    def replace(self, **overrides: Any) -> WoodFisherConfig:
        """A copy with ``overrides`` applied (old keyword names resolved as in :func:`resolve_config`).

        Args:
            **overrides: field values by name (``num_gradients=400``, ``method='magnitude'``, ...).

        Returns:
            The new, validated :class:`WoodFisherConfig` (``self`` when there is nothing to override).

        Raises:
            TypeError: an override is not a field (an old name whose meaning changed is named with its
                replacement).
            ValueError: a value out of range.
        """
        return resolve_config(self, overrides)

    def to_dict(self) -> dict:
        """The fields as a JSON-serialisable dict (tuples become lists).

        Returns:
            A dict field name → value, the inverse of :meth:`from_dict`.
        """
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> WoodFisherConfig:
        """The inverse of :meth:`to_dict` (unknown keys raise TypeError naming them).

        Args:
            values: field values by name, as written by :meth:`to_dict` (lists for ``block_size`` and
                ``sparsity_m_by_n`` accepted); missing fields take their defaults.

        Returns:
            The validated :class:`WoodFisherConfig`.

        Raises:
            TypeError: a key that is not a field (or an old name whose meaning changed).
            ValueError: a value out of range.
        """
        values = dict(values)
        for name in ("block_size", "sparsity_m_by_n"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return resolve_config(None, values)


FIELDS = tuple(f.name for f in dataclasses.fields(WoodFisherConfig))


def resolve_config(config: WoodFisherConfig | None, overrides: Mapping[str, Any],
                   where: str = "WoodFisherConfig") -> WoodFisherConfig:
    """``config`` (default: all defaults) with keyword ``overrides`` applied, validated once.

    Args:
        config: a :class:`WoodFisherConfig` or None.
        overrides: field values by name; ``num_samples`` is an alias of ``num_gradients``.
        where: the entry point's name, for error messages.

    Returns:
        The resolved :class:`WoodFisherConfig`.

    Raises:
        TypeError: ``config`` is not a WoodFisherConfig, or an override is not a field (an old name
            whose meaning changed is named with its replacement).
        ValueError: a value out of range (from :class:`WoodFisherConfig`).
    """
    if config is not None and not isinstance(config, WoodFisherConfig):
        raise TypeError(f"{where}: config must be a tfw.WoodFisherConfig or None, got {config!r} "
                        "(pass settings such as method='woodfisher' as keywords)")
    values, given_as = {}, {}
    for name, value in overrides.items():
        target = ALIASES.get(name, name)
        if name in RENAMED:
            raise TypeError(f"{where}: the keyword {name!r} is no longer accepted; use {RENAMED[name]}")
        if target not in FIELDS:
            hint = " (the Fisher chunk is fisher_block_size)" if name == "block" else ""
            raise TypeError(f"{where} got an unexpected keyword argument {name!r}{hint}")
        if target in values:
            raise TypeError(f"{where}: {given_as[target]!r} and {name!r} are the same setting; give one")
        values[target], given_as[target] = value, name
    if "block_size" in values and _is_int(values["block_size"]):
        raise TypeError(f"{where}: block_size is tfmot's (r, c) sparsity block shape; the Fisher chunk of "
                        f"{values['block_size']} weights is fisher_block_size={values['block_size']}")
    if "block_size" in values and values["block_size"] == "model":
        raise TypeError(f"{where}: block_size is tfmot's (r, c) sparsity block shape; one Fisher block for the "
                        "model is fisher_block_size='model'")
    if not values and config is not None:
        return config
    return dataclasses.replace(config, **values) if config is not None else WoodFisherConfig(**values)


def _error(name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{name} must be {expected}, got {value!r}")


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _positive_int(name: str, value: Any, expected: str = "an int ≥ 1") -> int:
    if not _is_int(value) or value < 1:
        raise _error(name, value, expected)
    return int(value)


def _int_pair(name: str, value: Any) -> tuple[int, int]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) and v >= 1 for v in value)):
        raise _error(name, value, "a pair of ints ≥ 1")
    return int(value[0]), int(value[1])
