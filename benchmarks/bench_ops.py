"""The ops of the benchmark suite, by name. A new op is one more bench_op_<op>.py declaring an OpBench, listed here."""
from __future__ import annotations

import bench_op_attention_transfer
import bench_op_channel_align
import bench_op_cwd
import bench_op_distill
import bench_op_kd
import bench_op_ofd
from bench_cases import OpBench

OPS: dict[str, OpBench] = {op.name: op for op in (
    bench_op_ofd.OP,
    bench_op_channel_align.OP,
    bench_op_attention_transfer.OP,
    bench_op_kd.OP,
    bench_op_cwd.OP,
    bench_op_distill.OP,
)}


def select(names: str | None) -> list[OpBench]:
    """The ops of a comma-separated list of names (None or "all": every op), in the suite's order."""
    if names is None or names == "all":
        return list(OPS.values())
    wanted = [name for name in names.split(",") if name]
    unknown = [name for name in wanted if name not in OPS]
    if unknown:
        raise ValueError(f"unknown ops {unknown}; choose from {list(OPS)}")
    return [op for name, op in OPS.items() if name in wanted]
