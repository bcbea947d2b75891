"""petri.errors: the SDK's exception tree (defined in petri.sdk.errors; see its docstring)."""

from petri.sdk.errors import *  # noqa: F403  (the names of its __all__, re-exported)
from petri.sdk.errors import __all__ as __all__
