"""Call hooks on MLX modules, and routing biases that the adapters' own routing sees.

Python looks ``__call__`` up on the type, so a hook swaps the instance's class for a one-off
subclass whose ``__call__`` runs the module's wrappers; leaving the context restores the original
class. A module has at most one hooked class: hooks installed on it by several users (the
observer, steering, a server's counters) join its chain of wrappers, the last installed outermost,
so they compose instead of fighting over the class. The parameters are untouched.

``router_biases`` registers an additive bias on the router logits of blocks whose router is a
raw weight array (nothing to hook): ``MoEAdapter.router_logits`` adds it, so the adapter's
routing (and so observation) sees the same steered logits as the block (``core.router_bias``).
"""

from contextlib import contextmanager
from functools import partial


def _hooked_class(cls):
    def __call__(self, *args, **kwargs):
        wrappers = type(self)._mlxfun_wrappers
        call = partial(cls.__call__, self)
        for wrapper in wrappers[:-1]:
            call = partial(wrapper, self, call)
        return wrappers[-1](self, call, *args, **kwargs)

    return type(
        cls.__name__,
        (cls,),
        {"__call__": __call__, "_mlxfun_hooked": True, "_mlxfun_wrappers": []},
    )


def _install(module, wrapper):
    cls = type(module)
    if "_mlxfun_wrappers" not in cls.__dict__:
        module.__class__ = _hooked_class(cls)
    type(module)._mlxfun_wrappers.append(wrapper)


def _remove(module, wrapper):
    cls = type(module)
    wrappers = cls.__dict__.get("_mlxfun_wrappers")
    if wrappers is None:
        return
    for i in range(len(wrappers) - 1, -1, -1):
        if wrappers[i] is wrapper:
            del wrappers[i]
            break
    if not wrappers:
        module.__class__ = cls.__mro__[1]


def install_hooks(hooks):
    """Install ``(module, wrapper)`` pairs now; returns the function that removes them (for
    changes that outlive a ``with`` block, like an intervention's ``apply``)."""
    installed = []

    def remove():
        while installed:
            _remove(*installed.pop())

    try:
        for module, wrapper in hooks:
            if any(m is module and w is wrapper for m, w in installed):
                raise RuntimeError(f"{type(module).__name__} is already hooked by this wrapper")
            _install(module, wrapper)
            installed.append((module, wrapper))
    except BaseException:
        remove()
        raise
    return remove


@contextmanager
def call_hooks(hooks):
    """Install ``(module, wrapper)`` pairs for the duration of the block.

    ``wrapper(module, call, *args, **kwargs)`` must return what ``call(*args, **kwargs)``
    returns, or the value the module should return instead (a routing transform). Several
    wrappers on one module chain: the last installed runs first and its ``call`` runs the one
    installed before it. The same wrapper object twice on one module is refused.
    """
    remove = install_hooks(hooks)
    try:
        yield
    finally:
        remove()


# id(block) -> (block, bias): biases on raw-array routers (see the module docstring)
_router_biases: dict[int, tuple] = {}


def router_bias(block):
    """The bias registered on ``block``'s raw-array router logits, or None."""
    entry = _router_biases.get(id(block))
    return entry[1] if entry is not None and entry[0] is block else None


def register_router_biases(pairs):
    """Register ``(block, bias)`` pairs now (a block takes one); returns the function that
    unregisters them."""
    added = []

    def remove():
        while added:
            _router_biases.pop(added.pop(), None)

    for block, bias in pairs:
        if router_bias(block) is not None:
            remove()
            raise RuntimeError(f"{type(block).__name__} already has a router bias")
        _router_biases[id(block)] = (block, bias)
        added.append(id(block))
    return remove
