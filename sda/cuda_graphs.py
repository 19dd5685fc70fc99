"""Replaying a training step as a CUDA graph: one launch per minibatch instead of one per op.

At the paper's small batches a step is ~15 tiny kernels. On a GPU, issuing them from Python costs
more than running them, so the device idles; a recorded graph replays them all in one launch.
"""

from collections.abc import Callable

import torch


def replay_as_cuda_graph(
    step: Callable[..., None],
    static_inputs: tuple[torch.Tensor, ...],
    warm_up: Callable[[], None],
    generator: torch.Generator | None = None,
) -> Callable[..., None]:
    """Record ``step(*static_inputs)`` once; return a function that runs it on new inputs.

    ``step`` must update only tensors that outlive it (parameters, accumulators) and must not
    synchronise with the host. ``warm_up`` runs the same kind of work on throwaway copies, so that
    library handles and memory exist before recording while the real parameters stay untouched
    (recording itself runs nothing). Random draws from ``generator`` inside ``step`` advance it
    on every replay, as an eager call would.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm_up()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        step(*static_inputs)

    def replay(*inputs: torch.Tensor) -> None:
        for static, new in zip(static_inputs, inputs):
            static.copy_(new)
        graph.replay()

    return replay
