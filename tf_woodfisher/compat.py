"""Every private hook into CPython, TensorFlow, tf_keras and tfmot that tf_woodfisher relies on, in one place.

Each hook is checked against the installed version when first used: if the private name it needs
is gone, a :class:`CompatibilityError` names the hook, the versions tested and the installed ones,
instead of an ``AttributeError`` deep inside a pruning event. Importing this module imports nothing
heavy; the TensorFlow, tf_keras and tfmot pieces are imported by the functions that use them.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator

TESTED = {"tensorflow": "2.21", "tf_keras": "2.21", "tensorflow_model_optimization": "0.8.1", "keras": "3.15"}


class CompatibilityError(RuntimeError):
    """A private hook that tf_woodfisher needs is missing from the installed TensorFlow / tf_keras / tfmot."""


def _missing(hook: str, module: str, error: Exception) -> CompatibilityError:
    installed = sys.modules.get(module)
    version = getattr(installed, "__version__", "unknown")
    return CompatibilityError(
        f"tf_woodfisher's hook {hook} does not fit the installed {module} {version} (tested with "
        f"{TESTED.get(module, '?')}): {error}. Install the versions pinned in setup.cfg.")


def check_versions(*modules: str) -> list:
    """Warn (RuntimeWarning) for each of ``modules`` whose installed version differs from the one tested.

    Args:
        *modules: import names among ``'tensorflow'``, ``'tf_keras'``, ``'tensorflow_model_optimization'``,
            ``'keras'`` (imported if not yet).

    Returns:
        The (module, installed, tested) triples that differ.
    """
    import warnings

    differing = []
    for module in modules:
        version = getattr(sys.modules.get(module) or __import__(module), "__version__", "unknown")
        if not str(version).startswith(TESTED[module]):
            differing.append((module, version, TESTED[module]))
    if differing:
        listing = ", ".join(f"{m} {v} (tested: {t})" for m, v, t in differing)
        warnings.warn(f"tf_woodfisher was tested with other versions than the installed {listing}; its private hooks "
                      "(tf_woodfisher.compat) raise CompatibilityError if they no longer fit", RuntimeWarning,
                      stacklevel=3)
    return differing


def imported_as_parent(package: str) -> bool:
    """True while CPython imports ``package`` only as the parent of one of its submodules.

    ``import tf_woodfisher.fisher`` first runs ``tf_woodfisher/__init__.py``; importlib's
    ``_find_and_load_unlocked`` frames then hold the dotted name being imported. Used so that the core
    subpackages (and ``tf_woodfisher.keras3``) can be imported without the tfmot entry's side effects.

    Args:
        package: the dotted name of the package whose ``__init__`` is running (e.g. ``'tf_woodfisher'``).

    Returns:
        True when a submodule ``package.<name>`` is the import under way (the caller's frame and its
        parents are inspected), False for a plain ``import package``.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_find_and_load_unlocked" and \
                frame.f_globals.get("__name__") == "importlib._bootstrap":
            name = frame.f_locals.get("name")
            if isinstance(name, str) and name.startswith(package + "."):
                return True
        frame = frame.f_back
    return False


def function(fn: Callable | None = None, **options: Any) -> Any:
    """``tf.function(fn, **options)`` for tf_woodfisher's own code; also a decorator, with or without options.

    AutoGraph then runs tf_woodfisher's functions as written, as it runs Keras' own (``fn`` gets TensorFlow's private
    ``autograph_artifact`` mark, and AutoGraph's private ``config.CONVERSION_RULES`` get
    ``DoNotConvert('tf_woodfisher')`` on the first call, for the functions reached through ``tf.map_fn``, a
    layer's ``call`` or :func:`user_code`): converting their source
    took about 3 s of a process's first pruning event (0.6 s for the rule gradient function alone) and slowed
    every later trace, and the code holds no Python control flow on tensors. AutoGraph stays on for what they
    call: Keras layers and losses convert their own ``call`` as under ``model.fit``, and a user's plain function
    is called through :func:`user_code`.

    Args:
        fn: the Python function to compile (None: return a decorator taking it).
        **options: ``tf.function``'s keyword arguments (``input_signature``, ``reduce_retracing``, ...).

    Returns:
        The ``tf.function`` of ``fn`` (or, without ``fn``, a decorator that makes it).

    Raises:
        CompatibilityError: TensorFlow's AutoGraph no longer has ``config.CONVERSION_RULES`` or
            ``autograph_artifact``.
    """
    import tensorflow as tf

    if fn is None:
        return lambda f: function(f, **options)
    global _AS_WRITTEN
    try:
        from tensorflow.python.autograph.core import config
        from tensorflow.python.autograph.impl import api

        if not _AS_WRITTEN:
            config.CONVERSION_RULES = (config.DoNotConvert("tf_woodfisher"), *config.CONVERSION_RULES)
            _AS_WRITTEN = True
        api.autograph_artifact(fn)  # tf.function converts the function it compiles whatever its module
    except (ImportError, AttributeError) as error:
        raise _missing("function", "tensorflow", error) from error
    return tf.function(fn, **options)


_AS_WRITTEN = False


def user_code(fn: Callable) -> Callable:
    """``fn`` (a user's forward, loss or schedule) as ``tf.function`` would call it: converted by AutoGraph when
    it is neither Keras', TensorFlow's nor tf_woodfisher's own code, so that Python control flow on tensors in it
    works inside tf_woodfisher's compiled functions (:func:`function`), as Keras calls a user's loss
    (``tf.__internal__.autograph.tf_convert``).

    Args:
        fn: any callable.

    Returns:
        A callable with ``fn``'s arguments and results.
    """
    import tensorflow as tf

    return tf.__internal__.autograph.tf_convert(fn, tf.__internal__.autograph.control_status_ctx())


@contextlib.contextmanager
def pfor_converter(op_type: str, make_converter: Callable[[Callable], Callable]) -> Iterator[None]:
    """While tracing, replace TensorFlow's pfor converter of ``op_type`` by ``make_converter(original)``.

    The converter gets tfmot-independent ``pfor_input`` objects (TensorFlow's private
    ``parallel_for.pfor`` API) and may call the original for cases it does not handle. The original
    converter is restored on exit, also when the body raises.

    Args:
        op_type: the TensorFlow op name whose converter is replaced (e.g. ``'MatMul'``).
        make_converter: called once with the original converter; returns the replacement converter.

    Yields:
        None, with the replacement registered for the duration of the ``with`` block.

    Raises:
        CompatibilityError: TensorFlow's private pfor registry is gone or has no converter for ``op_type``.
    """
    try:
        from tensorflow.python.ops.parallel_for import pfor

        registry = pfor._pfor_converter_registry
        original = registry[op_type]
    except (ImportError, AttributeError, KeyError) as error:
        raise _missing(f"pfor_converter({op_type!r})", "tensorflow", error) from error
    registry[op_type] = make_converter(original)
    try:
        yield
    finally:
        registry[op_type] = original


def pfor_wrap(tensor: Any, stacked: bool) -> Any:
    """TensorFlow's private ``pfor.wrap``: the output of a pfor converter.

    Args:
        tensor: the converted ``tf.Tensor``; when ``stacked``, its leading axis is the pfor loop axis.
        stacked: whether ``tensor`` holds one value per loop iteration (leading axis) or one shared value.

    Returns:
        The ``WrappedTensor`` a pfor converter returns.
    """
    from tensorflow.python.ops.parallel_for import pfor

    return pfor.wrap(tensor, stacked)


def function_definition(graph: Any, name: str) -> Any:
    """The ``FunctionDef`` of the function ``name`` in ``graph``'s library, or None when the graph does not hold it.

    Read with TensorFlow's private ``Graph._get_function``.

    Args:
        graph: a ``tf.Graph`` (a ``FuncGraph`` while tracing).
        name: the function's name, as in a call op's ``f`` attribute.

    Returns:
        The ``FunctionDef`` protocol buffer, or None.

    Raises:
        CompatibilityError: TensorFlow's graphs no longer have ``_get_function``.
    """
    try:
        function = graph._get_function(name)
    except AttributeError as error:
        raise _missing("function_definition", "tensorflow", error) from error
    if function is None:
        return None
    return getattr(function, "definition", None) or getattr(function, "cached_definition", None)


def keras_build_input_shape(model: Any) -> Any:
    """The input shape a tf_keras model was built with by ``model.build(shape)``, or None.

    Read from tf_keras' private ``_build_input_shape``.

    Args:
        model: a tf_keras model.

    Returns:
        The shape given to ``build`` (a shape, or a list / dict of them), or None when it was not built so.
    """
    return getattr(model, "_build_input_shape", None)


def keras_compiled_loss_weights(model: Any) -> Any:
    """The ``loss_weights`` given to a tf_keras ``model.compile``, or None.

    Kept by its private ``LossesContainer`` as ``_user_loss_weights``.

    Args:
        model: a tf_keras model.

    Returns:
        The ``loss_weights`` (a list, a dict by output name, or None); None also for an uncompiled model.

    Raises:
        CompatibilityError: the model is compiled but its loss container no longer keeps them there.
    """
    container = getattr(model, "compiled_loss", None)
    if container is None:
        return None
    try:
        return container._user_loss_weights
    except AttributeError as error:
        raise _missing("keras_compiled_loss_weights", "tf_keras", error) from error


def tfmot_pruning_classes() -> tuple[type, type]:
    """(PruneLowMagnitude, Pruning): tfmot's wrapper class and its private mask-update object.

    Returns:
        The pair of classes ``(PruneLowMagnitude, Pruning)``.

    Raises:
        CompatibilityError: the installed tfmot no longer has them where expected.
    """
    try:
        from tensorflow_model_optimization.python.core.sparsity.keras import pruning_impl, pruning_wrapper

        return pruning_wrapper.PruneLowMagnitude, pruning_impl.Pruning
    except (ImportError, AttributeError) as error:
        raise _missing("tfmot_pruning_classes", "tensorflow_model_optimization", error) from error


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its CPU kernels through oneDNN (``TF_ENABLE_ONEDNN_OPTS``, on by default on x86).

    TensorFlow 2.21's oneDNN batch matmul corrupts memory or aborts on operands of rank ≥ 4 with a unit batch axis,
    e.g. (32, 1, 2, 4) · (4, 5), which vectorised per-sample gradients of Keras 3 layers on sequences create
    (see ``tf_woodfisher.keras3.oneshot``).
    """
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError) as error:
        raise _missing("onednn_enabled", "tensorflow", error) from error


def keras3_build_shapes(layer: Any) -> Any:
    """Keras 3's record of the input shapes a layer or subclassed model was built with, or None.

    Args:
        layer: a Keras 3 layer or model.

    Returns:
        Its private ``Layer._build_shapes_dict`` (argument name → shape), or None when it has none.
    """
    return getattr(layer, "_build_shapes_dict", None)


def keras3_sublayers(layer: Any) -> list:
    """A Keras 3 layer and every layer inside it, depth first (MultiHeadAttention's four EinsumDense, say).

    Args:
        layer: a Keras 3 layer.

    Returns:
        Its private ``Layer._flatten_layers()`` (the layer first).

    Raises:
        CompatibilityError: Keras 3 no longer has that method.
    """
    try:
        return list(layer._flatten_layers(include_self=True, recursive=True))
    except (AttributeError, TypeError) as error:
        raise _missing("keras3_sublayers", "keras", error) from error


def optimizer_slots(optimizer: Any, variable: Any) -> list:
    """The optimizer's per-weight state (momentum, Adam moments, ...) of ``variable``.

    tf_keras' legacy optimizers expose ``get_slot_names``/``get_slot``; the new ones (tf_keras and
    Keras 3) keep slots in ``optimizer.variables``, named after the variable, with its shape. For a Keras 3
    optimizer pass the Keras variable (its ``path`` names the slots), not its ``.value``.

    Args:
        optimizer: a tf_keras (legacy or new) or Keras 3 optimizer, or None.
        variable: the trainable variable whose slots are wanted.

    Returns:
        The slot variables of ``variable``, each of ``variable``'s shape; empty when ``optimizer`` is None
        or holds no state for it.

    Raises:
        CompatibilityError: a Keras 3 optimizer without the private ``_trainable_variables`` list.
    """
    if optimizer is None:
        return []
    if hasattr(optimizer, "get_slot_names"):
        slots = []
        for name in optimizer.get_slot_names():
            try:
                slots.append(optimizer.get_slot(variable, name))
            except KeyError:
                continue
        return slots
    if hasattr(variable, "path") and type(optimizer).__module__.split(".")[0] == "keras":
        return _keras3_optimizer_slots(optimizer, variable)
    suffix = "/" + variable.name.split(":")[0]
    return [v for v in optimizer.variables
            if v.name.split(":")[0].endswith(suffix) and tuple(v.shape) == tuple(variable.shape)]


def _keras3_optimizer_slots(optimizer: Any, variable: Any) -> list:
    """Keras 3: a slot of the Keras variable ``variable`` is named ``<variable.path, '/' → '_'>_<slot name>``
    (``add_variable_from_reference``); it belongs to the variable of the optimizer with the longest such
    prefix (paths 'a/b' and 'a/b_c' share a prefix). A LossScaleOptimizer's slots are its inner optimizer's."""
    if hasattr(optimizer, "inner_optimizer"):
        return _keras3_optimizer_slots(optimizer.inner_optimizer, variable)
    try:
        known = [v.path.replace("/", "_") + "_" for v in optimizer._trainable_variables]
    except AttributeError as error:
        raise _missing("optimizer_slots (Keras 3 optimizer._trainable_variables)", "keras", error) from error
    prefix = variable.path.replace("/", "_") + "_"
    longer = [other for other in known if len(other) > len(prefix) and other.startswith(prefix)]
    return [v for v in optimizer.variables if v.name.startswith(prefix) and tuple(v.shape) == tuple(variable.shape)
            and not any(v.name.startswith(other) for other in longer)]


@contextlib.contextmanager
def capture_call_inputs(layer: Any, on_inputs: Callable[[Any], None]) -> Iterator[None]:
    """While active, ``on_inputs(inputs)`` sees the first argument of every call of ``layer.call``.

    tf_keras' and Keras 3's ``Layer.__call__`` (and tfmot's wrapper, which calls ``self.layer.call``) look
    ``call`` up on the instance at every call, so an instance attribute shadows the class's method; the
    original state is restored on exit, also when the body raises. Used by the layer-wise methods
    (:mod:`tf_woodfisher.keras_layerwise`) to read each layer's inputs during eager forward passes.

    Args:
        layer: a tf_keras or Keras 3 layer (a sublayer of a model: MultiHeadAttention's EinsumDense, say).
        on_inputs: called with the layer's input tensor (the first positional argument of ``call``).

    Yields:
        None, with the capture in place for the duration of the ``with`` block.

    Raises:
        CompatibilityError: the layer's ``call`` cannot be shadowed (no instance attributes).
    """
    had_own = "call" in vars(layer)
    original = layer.call

    def call(*args, **kwargs):
        on_inputs(args[0] if args else kwargs.get("inputs"))
        return original(*args, **kwargs)

    try:
        object.__setattr__(layer, "call", call)
    except (AttributeError, TypeError) as error:
        flavour = "keras" if type(layer).__module__.split(".")[0] == "keras" else "tf_keras"
        raise _missing("capture_call_inputs", flavour, error) from error
    try:
        yield
    finally:
        if had_own:
            object.__setattr__(layer, "call", original)
        else:
            object.__delattr__(layer, "call")
