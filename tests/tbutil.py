"""Reading TensorBoard event files back in tests."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(logdir, tag) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in read_events(logdir).Scalars(tag)]
