"""Replica weights and gradients inside Megatron's training step (schedules, DDP, optimizers).

A MicroEP layer's replicas (``runtime/replicas.py``) need three points of Megatron's step; this
module finds them for all MicroEP layers of one model (the layers built from one
``TransformerConfig``, by identity: every model chunk of a pipeline stage):

- **The first forward of a step.** The replica refresh of every layer starts there at once, so
  each overlaps the forward of the layers before it. A layer whose experts have forward pre-hooks
  (DDP with ``overlap_param_gather``: a module's parameters are current only after its pre-hook)
  starts its refresh in its own first forward instead, right after running them.
- **A layer's last backward of the step.** Megatron's schedules run the backward of every other
  micro-batch inside ``config.no_sync_func`` (per model chunk under interleaving). MicroEP wraps
  that function (``None`` included) with a counter, so a layer's backward outside it, after one
  inside it in the same step, is its last: the return of its fp32-accumulated replica gradients
  starts there, asynchronously.
- **Before DDP reduces a home expert's gradient.** Every path to the reduction of a DDP bucket
  group (``register_grad_ready`` under ``overlap_grad_reduce``, ``config.grad_sync_func``, and
  ``finish_grad_sync`` in ``finalize_model_grads``) goes through the bucket group's
  ``start_grad_sync``; MicroEP guards it for the bucket groups that hold home experts: first the
  returned replica gradients are added to ``main_grad`` in a fixed order (the return is started
  there if the backward did not). ``config.finalize_model_grads_func`` is wrapped to do the same
  for every layer.

DDP instances are found through the config: the owners of ``config.no_sync_func`` and
``config.grad_sync_func`` (bound DDP methods, set by Megatron-LM under ``--overlap-grad-reduce``)
and the model chunks that ``finalize_model_grads`` receives. A layer whose home experts are all in
guarded bucket groups returns its replica gradients once per step into ``main_grad``. Any other
layer (no DDP found yet, e.g. the first step of a run whose schedule does not use ``no_sync``, or
a plain torch loop) returns them through autograd in each of its step-last backward passes, which
without ``no_sync`` is every backward.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from megatron_microep.runtime.replicas import GradientReturn


class _Model:
    """The replica-carrying MicroEP layers of one model and the step state they share."""

    def __init__(self) -> None:
        self.layers: list[weakref.ref] = []
        self.no_sync_depth = 0  # > 0 inside config.no_sync_func

    def alive(self) -> list:
        """The layers in model order (global layer number, then construction order)."""
        layers = [ref() for ref in self.layers]
        layers = [m for m in layers if m is not None]
        return sorted(layers, key=lambda m: m.layer_number if m.layer_number is not None else 0)

    # --- wiring into the config ---------------------------------------------------------------
    def install(self, config) -> None:
        """Wrap ``config``'s no_sync and finalize functions (once) and guard the DDPs they name."""
        if not getattr(config.no_sync_func, "_microep_counts", False):
            config.no_sync_func = self._counted(config.no_sync_func)
        finalize = config.finalize_model_grads_func
        if finalize is not None and not getattr(finalize, "_microep_delivers", False):
            config.finalize_model_grads_func = self._delivering(finalize)
        for fn in (config.no_sync_func, config.grad_sync_func):
            for ddp in _owners(fn):
                self.guard(ddp)

    def _counted(self, no_sync):
        if isinstance(no_sync, (list, tuple)):  # one per model chunk (the interleaved schedule)
            return type(no_sync)(self._counted(fn) for fn in no_sync)

        @contextlib.contextmanager
        def counted_no_sync():
            self.no_sync_depth += 1
            try:
                with no_sync() if no_sync is not None else contextlib.nullcontext():
                    yield
            finally:
                self.no_sync_depth -= 1

        counted_no_sync._microep_counts = True
        counted_no_sync.__wrapped__ = no_sync
        return counted_no_sync

    def _delivering(self, finalize):
        def finalize_model_grads(model_chunks, *args, **kwargs):
            for chunk in model_chunks:
                if hasattr(chunk, "param_to_bucket_group"):
                    self.guard(chunk)
            for layer in self.alive():
                layer.deliver_replica_gradients()
            return finalize(model_chunks, *args, **kwargs)

        finalize_model_grads._microep_delivers = True
        finalize_model_grads.__wrapped__ = finalize
        return finalize_model_grads

    def guard(self, ddp) -> None:
        """Guard the bucket groups of ``ddp`` that hold home experts of this model's layers."""
        for layer in self.alive():
            for param in layer.replica_home_params():
                bucket_group = ddp.param_to_bucket_group.get(param)
                if bucket_group is not None and param not in layer.replica_buckets:
                    guarded = _guarded_layers(bucket_group)
                    if all(ref() is not layer for ref in guarded):
                        guarded.append(weakref.ref(layer))
                    layer.replica_buckets[param] = bucket_group

    # --- per step -----------------------------------------------------------------------------
    def gradient_return(self, layer) -> GradientReturn:
        """How ``layer`` returns its replica gradients in the step that starts now: into ``main_grad``
        where a guarded bucket or the wrapped ``finalize_model_grads`` delivers them before DDP reduces
        (in a DDP's first step, which this run may be in, only ``finish_grad_sync`` reduces)."""
        finalize_delivers = getattr(layer.config.finalize_model_grads_func, "_microep_delivers", False)
        deferred = all(
            hasattr(p, "main_grad") and (p in layer.replica_buckets or finalize_delivers)
            for p in layer.replica_home_params()
        )
        last = _LastBackward(self, deferred)
        return GradientReturn(last, layer.add_to_main_grad if deferred else None)


class _LastBackward:
    """Whether the running backward is the layer's last of the step (see the module doc)."""

    def __init__(self, model: _Model, deferred: bool):
        self.model = model
        self.deferred = deferred
        self.saw_no_sync = False

    def __call__(self) -> bool:
        if self.model.no_sync_depth > 0:
            self.saw_no_sync = True
            return False
        if self.deferred and not self.saw_no_sync:
            # One micro-batch, or a loop that bypasses config.no_sync_func: the guard returns them.
            return False
        self.saw_no_sync = False
        return True


def _owners(fn) -> list:
    """The DDP instances whose bound methods ``fn`` (a function, a list of them, or None) wraps."""
    fns = fn if isinstance(fn, (list, tuple)) else [fn]
    out = []
    for f in fns:
        if getattr(f, "_microep_counts", False):  # our counting wrapper (a bound method's own __wrapped__ is unbound)
            f = f.__wrapped__
        owner = getattr(f, "__self__", None)
        if hasattr(owner, "param_to_bucket_group"):
            out.append(owner)
    return out


def _guarded_layers(bucket_group) -> list[weakref.ref]:
    """The layers whose replica gradients must reach ``bucket_group`` before it reduces (guard installed once)."""
    layers = getattr(bucket_group, "_microep_layers", None)
    if layers is None:
        layers = []
        start_grad_sync = bucket_group.start_grad_sync

        def deliver_then_start_grad_sync(*args, **kwargs):
            for layer in sorted(
                (m for m in (ref() for ref in layers) if m is not None),
                key=lambda m: m.layer_number if m.layer_number is not None else 0,
            ):
                layer.deliver_replica_gradients()
            return start_grad_sync(*args, **kwargs)

        bucket_group.start_grad_sync = deliver_then_start_grad_sync
        bucket_group._microep_layers = layers
    return layers


_MODELS: dict[int, _Model] = {}


def model_of(config) -> _Model:
    """The model (replica layers and step state) of ``config``."""
    key = id(config)
    if key not in _MODELS:
        _MODELS[key] = _Model()
        weakref.finalize(config, _MODELS.pop, key, None)
    return _MODELS[key]


def join(layer) -> None:
    """Register a replica-carrying MicroEP layer with its model."""
    model_of(layer.config).layers.append(weakref.ref(layer))


def start_step(layer, step: int) -> None:
    """``layer``'s first forward of ``step``: start the step for every layer of its model."""
    model = model_of(layer.config)
    if layer.training:  # Megatron-LM sets up config.no_sync_func before its training loop, not before evaluation
        model.install(layer.config)
    for member in model.alive():
        if member._step != step:
            member.begin_replica_step(step, model.gradient_return(member))


def params_current(module: torch.nn.Module) -> bool:
    """False when some submodule has forward pre-hooks, which may still update its parameters."""
    return not any(m._forward_pre_hooks for m in module.modules())
