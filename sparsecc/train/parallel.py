"""Training a compiled model on several processes: DDP, and FSDP2 with one shard group per block.

    sharded = fully_shard_blocks(sm)          # after dist.init_process_group; sm holds no weights until gather_into
    opt = torch.optim.AdamW(sharded.parameters())
    ... train sharded on each rank's share of every batch ...
    sharded.gather_into(sm)                   # every rank: sm holds the trained weights; rank 0 saves it
    sharded.save_checkpoint("ckpt/")          # or: each rank writes its shards (torch.distributed.checkpoint);
    load_checkpoint(sm, "ckpt/")              #     read into a compiled model on one process

FSDP2's `fully_shard` gathers a module's parameters in that module's forward. A compiled graph is flat:
the blocks' parameters are read by `get_attr` nodes of one forward, so sharding a block of it (the
usual `for block in model.layers: fully_shard(block)`) leaves its parameters sharded when the graph
reads them ("got mixed torch.Tensor and DTensor"). `fully_shard_blocks` therefore cuts a copy of the
graph into one submodule per transformer block (the numbered module of each node's `nn_module_stack`:
`encoder.layer.3`, `model.layers.0`, ...), with what comes before the first block and after the last
in submodules of their own; each submodule reads its parameters itself (through one small module per
parameter) and is one FSDP2 group. Buffers (layouts, position ids) stay unsharded on every rank.

A token-flow model trains its soft-gate graph, whose gate module (`sparsecc_flow`) is one module called
from every block: a parameter in several FSDP2 groups. Its parameters (per layer a scorer or a table)
are left out of the groups (`ignored_params`) and stay whole on every rank; their gradients are averaged
over the ranks at the end of each backward, as DDP would.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from sparsecc import distributed
from sparsecc.errors import DistributedError, UnsupportedError
from sparsecc.saving import read_checkpoint

_NUMBERED = re.compile(r"^(.*\.)?\d+$")  # a module path ending in an index: a block of a ModuleList
_PARAMS = "sparsecc_params"  # where the parameter holders live in the cut graph


def data_parallel(module: nn.Module, options: Optional[dict] = None) -> nn.Module:
    """`module` under DistributedDataParallel when several processes train it (itself otherwise)."""
    if distributed.current() is None:
        return module
    return nn.parallel.DistributedDataParallel(module, **(options or {}))


class _Parameter(nn.Module):
    """Holds one parameter of the graph; calling it reads the parameter (gathered by FSDP2 in the forward of
    the block that holds it)."""

    def __init__(self, param: nn.Parameter):
        super().__init__()
        self.param = param

    def forward(self) -> torch.Tensor:
        return self.param


class ShardedModel(nn.Module):
    """The blocks of a compiled model, each an FSDP2 group: train it like the SparseModel it came from."""

    def __init__(self, graph: fx.GraphModule, call_defaults: dict, names: dict, blocks: list,
                 out_spec: Optional[Any] = None, replicated: Optional[list] = None):
        super().__init__()
        self.graph_module = graph
        self._call_defaults = dict(call_defaults)
        self.names = dict(names)  # parameter name here -> name in the SparseModel
        self.blocks = list(blocks)  # module path of each block, in order
        self.out_spec = out_spec  # the model's output structure (the cut graph returns its leaves)
        self.replicated = list(replicated or [])  # parameters whole on every rank (token flow's gates)

    def forward(self, *args, **kwargs):
        out = self.graph_module(*args, **{**self._call_defaults, **kwargs})
        if self.out_spec is not None:
            out = pytree.tree_unflatten(list(out) if isinstance(out, (tuple, list)) else [out], self.out_spec)
        if self.replicated and torch.is_grad_enabled():
            self._average_after_backward(out)
        return out

    def _average_after_backward(self, out: Any) -> None:
        """Average the replicated parameters' gradients over the ranks once this output's backward is done
        (autograd runs a queued callback when the whole backward pass ends, after every gradient is in)."""
        queued = [False]

        def queue(grad: torch.Tensor) -> torch.Tensor:
            if not queued[0]:
                queued[0] = True
                torch.autograd.Variable._execution_engine.queue_callback(self.average_replicated_grads)
            return grad

        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                leaf.register_hook(queue)

    def average_replicated_grads(self) -> None:
        """Each replicated parameter's gradient replaced by its mean over the ranks (None where no rank has
        one), in one all-reduce. Runs by itself after each backward through this model's outputs."""
        comm = distributed.current()
        flat = torch.cat([torch.tensor([p.grad is not None for p in self.replicated], dtype=torch.float32)]
                         + [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten()
                            for p in self.replicated])
        comm.average_(flat)
        offset = len(self.replicated)
        for i, p in enumerate(self.replicated):
            grad, offset = flat[offset:offset + p.numel()], offset + p.numel()
            if flat[i] > 0:
                p.grad = grad.view_as(p).to(p.dtype).clone()

    def save_checkpoint(self, directory: str) -> None:
        """Write the parameters as a distributed checkpoint (torch.distributed.checkpoint: every rank writes
        its shards, in parallel), under the SparseModel's parameter names: `load_checkpoint(sm, directory)`
        reads it on one process, or on any number of ranks. A collective: every rank calls it. The checkpoint's
        metadata is written last, so an interrupted save leaves a folder that `load_checkpoint` refuses."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        state = get_model_state_dict(self)
        dcp.save({self.names[k]: v for k, v in state.items() if k in self.names}, checkpoint_id=directory)

    def full_parameters(self) -> dict:
        """{SparseModel parameter name: the whole tensor}, gathered from every rank one parameter at a time
        (a collective: every rank calls it)."""
        with torch.no_grad():
            return {self.names[k]: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
                    for k, p in self.named_parameters() if k in self.names}

    def gather_into(self, sm: nn.Module) -> None:
        """Give `sm` the trained parameters, gathered from every rank (a collective: every rank calls it)."""
        fill_parameters(sm, self.full_parameters())


def fill_parameters(sm: nn.Module, values: dict) -> None:
    """Set each parameter of `sm` to `values[name]` (its storage was released while the blocks were sharded)."""
    with torch.no_grad():
        for name, param in sm.named_parameters():
            param.data = values[name].to(param.device, param.dtype).clone()


def _block_of(node: fx.Node) -> Optional[str]:
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if path and _NUMBERED.match(path):
            return path
    return None


def _with_parameter_modules(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict]:
    """A copy of `gm` whose parameters are read by calling a module each (FSDP2 can gather those in the
    forward of the submodule that holds them); buffers and constants stay attributes of the root."""
    params = dict(gm.named_parameters())
    root, holders, names = nn.Module(), nn.Module(), {}
    root.add_module(_PARAMS, holders)
    graph, env = fx.Graph(), {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in params:
            flat = node.target.replace(".", "_")
            if not hasattr(holders, flat):
                holders.add_module(flat, _Parameter(params[node.target]))
            env[node] = graph.call_module(f"{_PARAMS}.{flat}", ())
            env[node].meta = dict(node.meta)
            names[flat] = node.target
            continue
        if node.op == "get_attr":  # a buffer (layout, position ids) or a constant: replicated, at the root
            flat = node.target.replace(".", "_")
            if not hasattr(root, flat):
                owner, _, attr = node.target.rpartition(".")
                value = getattr(gm.get_submodule(owner), attr)
                if isinstance(value, torch.Tensor):
                    root.register_buffer(flat, value)
                else:
                    setattr(root, flat, value)
            env[node] = graph.get_attr(flat)
            env[node].meta = dict(node.meta)
            continue
        if node.op == "call_module" and not hasattr(root, node.target):
            root.add_module(node.target, gm.get_submodule(node.target))
        env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(root, graph), names


def fully_shard_blocks(sm: Any, **fsdp_options: Any) -> ShardedModel:
    """`sm`'s graph cut into one submodule per block, each sharded with FSDP2's `fully_shard` (`fsdp_options`:
    its keyword options, e.g. mp_policy, reshard_after_forward). Needs an initialised process group.

    The returned model takes over `sm`'s parameters (FSDP2 replaces them by their shards, and `sm`'s own
    tensors are released, so each rank holds 1/world of the weights): train the returned model, then
    `gather_into(sm)` to give `sm` its weights back, to read, save or export the result."""
    from torch.distributed.fsdp import fully_shard
    from torch.fx.passes.split_module import split_module
    from sparsecc.methods.token_flow.model import FlowSparseModel
    from sparsecc.model import SparseModel

    if distributed.current() is None:
        raise DistributedError("fully_shard_blocks needs torch.distributed initialised with more than one process "
                               "(torchrun, or dist.init_process_group); on one process train the model itself")
    if type(sm) not in (SparseModel, FlowSparseModel) or sm.backend != "eager":
        raise UnsupportedError(f"fully_shard_blocks takes a SparseModel compiled with backend='eager'; got "
                               f"{type(sm).__name__}" + (f" on {sm.backend!r}" if hasattr(sm, "backend") else "")
                               + ": compile with backend='eager' to train, then lower the trained model")
    # a token-flow model trains its soft-gate graph (in eval mode the same graph takes the hard decisions)
    source = sm.train_graph_module if isinstance(sm, FlowSparseModel) else sm.graph_module
    flat, names = _with_parameter_modules(source)
    # modules the graph calls (token flow's gates, called from every block): whole on every rank
    replicated = {id(p): p for n in flat.graph.nodes if n.op == "call_module" and not n.target.startswith(_PARAMS)
                  for p in flat.get_submodule(n.target).parameters()}
    ignored = set(replicated.values())
    # one partition per block, in graph order; nodes between blocks join the block before them, what
    # precedes the first block is partition 0 and what follows the last block's last node the tail
    order: dict[str, int] = {}
    computed = [n for n in flat.graph.nodes if n.op not in ("placeholder", "get_attr", "output")
                and not (n.op == "call_module" and n.target.startswith(_PARAMS))]
    last_block_node = max((i for i, n in enumerate(computed) if _block_of(n)), default=-1)
    partition, current = {}, 0
    for i, node in enumerate(computed):
        block = _block_of(node)
        if block is not None and block not in order:
            order[block] = len(order) + 1
        current = order[block] if block is not None else current
        partition[node] = current if i <= last_block_node else len(order) + 1
    if not order:
        raise UnsupportedError("fully_shard_blocks found no blocks in the graph (no node belongs to a numbered "
                               "module such as encoder.layer.0); shard the whole model with fully_shard(sm)")
    for node in flat.graph.nodes:
        if node.op == "call_module" and node.target.startswith(_PARAMS):
            users = {partition[u] for u in node.users}
            if len(users) > 1:
                raise UnsupportedError(f"parameter {names[node.target.split('.', 1)[1]]!r} is read by blocks "
                                       f"{sorted(users)} (a weight shared across blocks); FSDP2 groups cannot "
                                       "share a parameter: shard the whole model with fully_shard(sm)")
            partition[node] = users.pop()
    cut = split_module(flat, flat, lambda n: partition[n])
    prefix, here = _PARAMS + "_", {}  # split_module names a submodule's call_module targets with "_" for "."
    for sub_name, sub in cut.named_children():
        for name, _ in sub.named_children():
            if name.startswith(prefix):
                here[f"graph_module.{sub_name}.{name}.param"] = f"graph_module.{names[name[len(prefix):]]}"
        if any(id(p) not in replicated for p in sub.parameters()):
            fully_shard(sub, ignored_params=ignored, **fsdp_options)
    fully_shard(cut, ignored_params=ignored, **fsdp_options)
    sm_names = {id(p): name for name, p in sm.named_parameters()}
    for name, p in cut.named_parameters():
        if id(p) in replicated:
            here[f"graph_module.{name}"] = sm_names[id(p)]
    # FSDP2 copied each rank's shard; sm's own (unsharded) tensors would keep every weight on every rank
    # while it trains: released here, filled again by gather_into (the replicated ones are the model's own)
    with torch.no_grad():
        for param in sm.parameters():
            if id(param) not in replicated:
                param.data = param.data.new_empty(0)
    info = getattr(source.graph._codegen, "pytree_info", None)
    return ShardedModel(cut, sm.call_defaults, here, list(order), out_spec=info.out_spec if info else None,
                        replicated=list(replicated.values()))


def fully_shard_layers(module: nn.Module, **fsdp_options: Any) -> nn.Module:
    """FSDP2's usual recipe on an eager model: each numbered block (a child of a ModuleList: `encoder.layer.3`,
    `model.layers.0`, ...) one group, the rest in the root's. In place; returns `module`."""
    from torch.distributed.fsdp import fully_shard

    if distributed.current() is None:
        raise DistributedError("FSDP2 needs torch.distributed initialised with more than one process "
                               "(torchrun, or dist.init_process_group); on one process train the model itself")
    blocks = [m for parent in module.modules() if isinstance(parent, nn.ModuleList) for m in parent]
    if not blocks:
        raise UnsupportedError(f"{type(module).__name__} has no numbered blocks (no nn.ModuleList of layers) to "
                               "shard one per group; shard it yourself with fully_shard(model)")
    for block in blocks:
        fully_shard(block, **fsdp_options)
    fully_shard(module, **fsdp_options)
    return module


def full_state(module: nn.Module) -> dict:
    """The whole parameters and buffers of an FSDP2-sharded module, on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))


def load_checkpoint(sm: nn.Module, directory: str) -> nn.Module:
    """Read the parameters a `ShardedModel.save_checkpoint` wrote into `sm` (a SparseModel compiled with the
    same recipe; one process, no process group needed). Returns `sm`. For a model saved with
    `sparsecc.save`: `sparsecc.load(model_dir, checkpoint=directory)`."""
    read_checkpoint(dict(sm.named_parameters()), directory)
    return sm
