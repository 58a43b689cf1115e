"""PyTorch reference modules written from the published code (see ``docs/conventions.md``).

A plain module of classes, imported by tests after ``pytest.importorskip("torch")``.
"""

import math

import torch


class UltraFastFFReference(torch.nn.Module):
    """UltraFastBERT's FFF-v2 layer (``training/cramming/architectures/fff.py``), masked dense form.

    ``linear_in`` (with bias) computes every node, exact ``nn.GELU()``, strict ``> 0`` routing in
    each of the K trees, then ``linear_out`` (no bias) on the activations times the path mask.
    Keys: ``linear_in.weight (K*N, in)``, ``linear_in.bias (K*N,)``, ``linear_out.weight (out, K*N)``.
    The published code ends with ``reshape_as(x)`` (so ``out == in``); this one reshapes to
    ``(..., out)``, which is the same when the widths agree.
    """

    def __init__(self, input_width: int, output_width: int, depth: int, parallel_size: int):
        super().__init__()
        self.input_width, self.output_width = input_width, output_width
        self.depth, self.parallel_size = depth, parallel_size
        self.n_nodes = 2 ** (depth + 1) - 1
        self.linear_in = torch.nn.Linear(input_width, parallel_size * self.n_nodes, bias=True)
        self.linear_out = torch.nn.Linear(parallel_size * self.n_nodes, output_width, bias=False)
        init_k = math.sqrt(1.0 / input_width)
        self.linear_in.weight.data.uniform_(-init_k, init_k)
        self.linear_in.bias.data.uniform_(-init_k, init_k)
        init_k2 = math.sqrt(1.0 / ((depth + 1) * parallel_size))
        self.linear_out.weight.data.uniform_(-init_k2, init_k2)
        self.activation = torch.nn.GELU()

    def forward(self, oldx: torch.Tensor) -> torch.Tensor:
        x = oldx.reshape(-1, self.input_width)
        batch_size = x.shape[0]
        logits = self.linear_in(x)                                       # (B, K*N)
        decisions = (logits > 0).long().view(batch_size, self.parallel_size, self.n_nodes)
        activations = self.activation(logits).view(batch_size, self.parallel_size, self.n_nodes)
        with torch.no_grad():
            current_nodes = torch.zeros((batch_size, self.parallel_size), dtype=torch.long, device=x.device)
            decision_map = torch.zeros_like(decisions, dtype=activations.dtype)
            decision_map.scatter_(dim=2, index=current_nodes.unsqueeze(-1), value=1.0)
            for d in range(self.depth):
                platform, next_platform = 2**d - 1, 2 ** (d + 1) - 1
                moves = torch.gather(decisions, 2, current_nodes.unsqueeze(2)).squeeze(2)
                next_nodes = (current_nodes - platform) * 2 + moves + next_platform
                decision_map.scatter_(2, next_nodes.unsqueeze(-1), 1.0)
                current_nodes = next_nodes
        activations = activations * decision_map
        y = self.linear_out(activations.flatten(1, 2))
        return y.reshape(*oldx.shape[:-1], self.output_width)
