"""Pipeline schedules: the order in which one stage runs the forward (F) and backward (B) passes of
a step's microbatches.

    GPipe (Huang et al., 2019): every forward, then every backward. A stage holds the
        activations of all M microbatches at once.
    1F1B (PipeDream-Flush, Narayanan et al., 2021): stage s runs min(S − s − 1, M) warm-up
        forwards, then alternates one forward and one backward, then drains the remaining
        backwards. A stage holds at most S − s microbatches' activations, whatever M is.

Both are synchronous: gradients of all M microbatches are accumulated and the optimizer steps once
after the flush, so both give the same weights as the unpipelined step. With S equal stages the
idle share of each stage, the bubble, is (S − 1) / (M + S − 1) for both.

An action is ("F", microbatch) or ("B", microbatch). What each implies — receive the input from
stage s − 1 (or read the images at stage 0), send the output to stage s + 1 (or take the loss at
the last stage), and the reverse for B — is the executor's business (cluster/rank/pipeline.py).
"""

SCHEDULES = ("1f1b", "gpipe")

Action = tuple[str, int]


def stage_actions(schedule: str, stage: int, stages: int, microbatches: int) -> list[Action]:
    """The actions stage `stage` of `stages` runs in one training step of `microbatches`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is outside 0..{stages - 1}")
    m = range(microbatches)
    if schedule == "gpipe":
        return [("F", i) for i in m] + [("B", i) for i in m]
    warmup = min(stages - stage - 1, microbatches)
    actions = [("F", i) for i in range(warmup)]
    for i in range(microbatches - warmup):  # steady state: one forward, one backward
        actions += [("F", warmup + i), ("B", i)]
    actions += [("B", i) for i in range(microbatches - warmup, microbatches)]
    return actions


def forward_actions(microbatches: int) -> list[Action]:
    """Evaluation: forwards only, in order, on every stage."""
    return [("F", i) for i in range(microbatches)]


def peak_in_flight(actions: list[Action]) -> int:
    """Most microbatches whose forward has run and whose backward has not, at any point."""
    live = peak = 0
    for kind, _ in actions:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def ideal_bubble(stages: int, microbatches: int) -> float:
    """The idle share of every stage when all stages take equal time and links are free."""
    return (stages - 1) / (microbatches + stages - 1)


def expected_bubble(schedule: str, forward_s: list[float], backward_s: list[float], microbatches: int) -> float:
    """The mean idle share of the step for stages whose forward and backward of one microbatch
    take `forward_s[s]` and `backward_s[s]`, with free links. GPipe's forwards cross every stage
    once and then go at the slowest forward's pace, and its backwards likewise:
    T = Σ f + (M − 1)·max f + Σ b + (M − 1)·max b. 1F1B's steady state goes at the slowest
    stage's forward + backward: T = Σ (f + b) + (M − 1)·max (f + b). Stage s computes for
    M·(f_s + b_s) of T. Equal stages give `ideal_bubble` for both."""
    m = microbatches
    if schedule == "gpipe":
        step = sum(forward_s) + (m - 1) * max(forward_s) + sum(backward_s) + (m - 1) * max(backward_s)
    else:
        both = [f + b for f, b in zip(forward_s, backward_s)]
        step = sum(both) + (m - 1) * max(both)
    busy = m * (sum(forward_s) + sum(backward_s)) / len(forward_s)
    return 1.0 - busy / step
