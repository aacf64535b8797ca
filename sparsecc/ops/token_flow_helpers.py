"""Old import path of `sparsecc.ops.token_flow.helpers` (kept for modules that import it from here)."""

from sparsecc.ops.token_flow.helpers import *  # noqa: F401,F403
from sparsecc.ops.token_flow.helpers import __all__  # noqa: F401
