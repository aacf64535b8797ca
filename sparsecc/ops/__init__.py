"""sparsecc custom ops (torch.library, namespace `sparsecc`). Importing registers them."""

from sparsecc.ops.attention import attention
from sparsecc.ops.ffn import ffn

__all__ = ["attention", "ffn"]
