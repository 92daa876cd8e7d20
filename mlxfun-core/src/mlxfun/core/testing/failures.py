"""How every check fails: an ``AssertionError`` naming the plugin and what to fix."""


def plugin_label(kind: str, obj) -> str:
    return f"{kind} {getattr(obj, 'name', None)!r} ({type(obj).__name__})"


def fail(label: str, message: str):
    raise AssertionError(f"{label}: {message}")
