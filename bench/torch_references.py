"""PyTorch transcriptions of official modules that pytorch-metric-learning does not have.

Shared by the benchmarks (``losses.py`` on the CPU, ``gpu_check.py`` on a GPU); importing
this module has no side effects. The tests check proxy_jax against the official code itself
(fixtures); these transcriptions are the torch side of the speed comparisons.
"""

import collections

import torch
import torch.nn.functional as F

__all__ = ["TorchMemVir"]


class TorchMemVir:
    """The official MemVir queue: read before push, ages M+1, 2(M+1), ... most recent first.

    Proxies are kept in the official [D, C] layout.
    """

    def __init__(self, num_steps, step_gap):
        self.step_gap = step_gap
        self.queue = collections.deque(maxlen=num_steps * (step_gap + 1))

    def read(self):
        return list(self.queue)[::-1][self.step_gap::self.step_gap + 1]

    def push(self, x, labels, weight):
        self.queue.append((x.detach(), labels.detach(), weight.detach().clone()))

    def norm_softmax_step(self, x_hat, labels, weight, scale):
        """One official NormSoftmax forward+backward with MemVir (x_hat already normalized)."""
        virtual = self.read()
        self.push(x_hat, labels, weight)
        c = weight.shape[1]
        all_w = torch.cat([weight] + [w for _, _, w in virtual], dim=1)
        all_x = torch.cat([x_hat] + [e for e, _, _ in virtual], dim=0)
        all_y = torch.cat([labels] + [y + (k + 1) * c for k, (_, y, _) in enumerate(virtual)])
        logits = scale * (all_x @ F.normalize(all_w, dim=0))
        return F.cross_entropy(logits, all_y)
