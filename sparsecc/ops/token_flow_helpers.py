"""Old import path of `sparsecc.ops.token_flow.helpers` (kept for the modules that import it from here)."""

from sparsecc.ops.token_flow.helpers import (__all__, flow_attention_mask, flow_mix, gather_packed,  # noqa: F401
                                             gather_tokens, pack_slots, packed_route, scatter_packed, soft_key_mask,
                                             valid_tokens)
