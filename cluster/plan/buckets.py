"""Gradient buckets: which parameters the replicas all-reduce together.

The rule DistributedDataParallel uses: the parameters, last first (the order backward finishes
their gradients), are cut into buckets, a bucket closed as soon as it holds `bucket_bytes` or
more. cluster/rank/gradsync.py runs it on the actor's parameters; cluster/plan/scaling.py
predicts the all-reduce with the same cut.
"""

DEFAULT_BUCKET_BYTES = 25 * 2**20  # DDP's default


def bucket_layout(nbytes: list[int], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[int]]:
    """Indices into `nbytes` (sizes in module order), one list per bucket, in launch order:
    e.g. sizes [4, 4, 8] with bucket_bytes 8 give [[2], [1, 0]]."""
    buckets, current, size = [], [], 0
    for index in reversed(range(len(nbytes))):
        current.append(index)
        size += nbytes[index]
        if size >= bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets
