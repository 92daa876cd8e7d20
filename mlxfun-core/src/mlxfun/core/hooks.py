"""Call hooks on MLX modules.

Python looks ``__call__`` up on the type, so a hook swaps the instance's class for a one-off
subclass whose ``__call__`` runs the wrapper; leaving the context restores the original class.
The parameters, and so the outputs, are untouched.
"""

from contextlib import contextmanager


def _hooked_class(cls, wrapper):
    def __call__(self, *args, **kwargs):
        return wrapper(self, lambda *a, **k: cls.__call__(self, *a, **k), *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "_mlxfun_hooked": True})


@contextmanager
def call_hooks(hooks):
    """Install ``(module, wrapper)`` pairs for the duration of the block.

    ``wrapper(module, call, *args, **kwargs)`` must return what ``call(*args, **kwargs)``
    returns (it may record arguments and results on the way).
    """
    originals = []
    try:
        for module, wrapper in hooks:
            if getattr(module, "_mlxfun_hooked", False):
                raise RuntimeError(f"{type(module).__name__} is already hooked")
            originals.append((module, module.__class__))
            module.__class__ = _hooked_class(module.__class__, wrapper)
        yield
    finally:
        for module, cls in reversed(originals):
            module.__class__ = cls
