"""train.cuda_graph: the whole training step (forward, losses, backward, SGD update) captured
once in a CUDA graph and replayed for every batch (torch.cuda.graphs, PyTorch's "whole network
capture"). Small nets on big GPUs are bound by kernel launches, not by arithmetic: the CIFAR
ResNets at the paper's batch 128 launch hundreds of kernels per step that each finish in
microseconds, and a replay launches them all at once.

A replay reads its batch from static input tensors, written before it, and the learning rate
of each parameter group from a device tensor (fused SGD takes a tensor lr), written from the
schedule's value before it; everything else it touches (weights, BN statistics, momentum
buffers, gradients) stays at fixed addresses. torch needs a few eager steps before capturing
(on a side stream); canon runs them on the first batch and then undoes them (`restored_after`,
and the CUDA generator's state), so the first replay starts from the state the uncaptured run
would step from. A torch.compile'd model compiles in those warm-up steps, so the capture
records its generated kernels (compiling inside a capture fails: pytorch/pytorch#131782). On
a CPU there is nothing to capture: the same static-buffer step runs eagerly, which is how the
tests cover its logic there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from canon.errors import ConfigError, DataError

Step = Callable[[torch.Tensor, torch.Tensor], Any]  # its outputs: tensors a replay rewrites
WARMUP_STEPS = 3  # eager steps before capture: cuDNN's algorithm choice, the allocator's pools


@contextlib.contextmanager
def restored_after(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """On exit, the model's weights and buffers and the optimizer's momentum buffers hold
    their values from entry again, in place (a captured graph keeps their addresses);
    momentum buffers created inside are zeroed, which makes the next SGD step (dampening 0)
    the first step it would have been."""
    tensors = [*model.state_dict().values(), *_momentum_buffers(optimizer)]
    saved = [tensor.detach().clone() for tensor in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved, strict=True):
                tensor.copy_(value)
            known = {id(tensor) for tensor in tensors}
            for buffer in _momentum_buffers(optimizer):
                if id(buffer) not in known:
                    buffer.zero_()


def _momentum_buffers(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [state["momentum_buffer"] for state in optimizer.state.values()
            if state.get("momentum_buffer") is not None]


class GraphedStep:
    """`step(images, targets)` (forward, backward and optimizer.step(), returning tensors
    such as the loss) replayed from a CUDA graph captured at the first call (`capture`), or
    run eagerly on the same static buffers. Every batch must hold `batch_size` images of the
    first one's shape."""

    def __init__(self, step: Step, model: nn.Module, optimizer: torch.optim.Optimizer,
                 batch_size: int, capture: bool) -> None:
        if any(group["dampening"] for group in optimizer.param_groups):
            raise ConfigError("train.cuda_graph needs SGD without dampening")
        if capture and not all(group.get("fused") for group in optimizer.param_groups):
            raise ConfigError("train.cuda_graph captures fused SGD (a tensor lr, no host sync): "
                              "every parameter must be on one GPU")
        self.step, self.model, self.optimizer = step, model, optimizer
        self.batch_size, self.capture = batch_size, capture
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.outputs: Any = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.lrs: list[torch.Tensor] = []

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> Any:
        if len(targets) != self.batch_size or (
                self.inputs is not None and images.shape != self.inputs[0].shape):
            raise DataError(
                f"train.cuda_graph replays one step for every batch of {self.batch_size} "
                f"images of one size; got a batch of {tuple(images.shape)} (short of "
                "undecodable files?): remove or repair them, or set train.cuda_graph false"
            )
        if self.inputs is None:
            self.inputs = (images.clone(), targets.clone())  # clone keeps channels_last
        self.inputs[0].copy_(images)
        self.inputs[1].copy_(targets)
        if not self.capture:
            outputs = self.step(*self.inputs)
            self.optimizer.zero_grad(set_to_none=True)
            return outputs
        # On the inputs' device, not the current one: the graph is captured and launched on
        # a stream of the current device (a bench on cuda:1 never makes it current).
        with torch.cuda.device(self.inputs[0].device):
            if self.graph is None:
                self._capture()
            for lr, group in zip(self.lrs, self.optimizer.param_groups, strict=True):
                lr.fill_(group["lr"])
            self.graph.replay()
        return self.outputs

    def _capture(self) -> None:
        """Warm up eagerly on a side stream, capture with each group's lr a device tensor,
        and undo the warm-up (the CUDA generator's draws, for dropout, included)."""
        groups = self.optimizer.param_groups
        device = self.inputs[0].device
        with restored_after(self.model, self.optimizer):
            generator_state = torch.cuda.get_rng_state(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self.step(*self.inputs)
                    self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.set_rng_state(generator_state, device)
            rates = [group["lr"] for group in groups]
            self.lrs = [torch.tensor(float(rate), device=device) for rate in rates]
            for group, lr in zip(groups, self.lrs, strict=True):
                group["lr"] = lr
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: the loader's pin-memory thread may allocate meanwhile. A
                # compiled model must not compile again inside the capture, where dynamo's
                # own error would be an obscure one about the CUDA generator.
                with torch.compiler.set_stance("fail_on_recompile"), \
                        torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.outputs = self.step(*self.inputs)
            finally:  # the schedule, checkpoints and logs keep plain floats
                for group, rate in zip(groups, rates, strict=True):
                    group["lr"] = rate
            self.graph = graph
