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


@contextlib.contextmanager
def pfor_converter(op_type: str, make_converter: Callable[[Callable], Callable]) -> Iterator[None]:
    """While tracing, replace TensorFlow's pfor converter of ``op_type`` by ``make_converter(original)``.

    The converter gets tfmot-independent ``pfor_input`` objects (TensorFlow's private
    ``parallel_for.pfor`` API) and may call the original for cases it does not handle.
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
    """TensorFlow's private ``pfor.wrap``: the output of a pfor converter."""
    from tensorflow.python.ops.parallel_for import pfor

    return pfor.wrap(tensor, stacked)


def tfmot_pruning_classes() -> tuple[type, type]:
    """(PruneLowMagnitude, Pruning): tfmot's wrapper class and its private mask-update object."""
    try:
        from tensorflow_model_optimization.python.core.sparsity.keras import pruning_impl, pruning_wrapper

        return pruning_wrapper.PruneLowMagnitude, pruning_impl.Pruning
    except (ImportError, AttributeError) as error:
        raise _missing("tfmot_pruning_classes", "tensorflow_model_optimization", error) from error


def optimizer_slots(optimizer: Any, variable: Any) -> list:
    """The optimizer's per-weight state (momentum, Adam moments, ...) of ``variable``.

    tf_keras' legacy optimizers expose ``get_slot_names``/``get_slot``; the new ones (tf_keras and
    Keras 3) keep slots in ``optimizer.variables``, named after the variable, with its shape. For a Keras 3
    optimizer pass the Keras variable (its ``path`` names the slots), not its ``.value``.
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
