"""The child process of a pinned testbed build (see :mod:`shoal.testbed.build`).

Started as ``python -m shoal.testbed._child JOB`` with the kernel settings in its
environment; reports progress as tab-separated lines on stdout, and a user
error as ``error<TAB>class<TAB>message`` (exit 2).
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    """Build the testbed ``argv[0]`` (JSON) describes; 0 when done."""
    from shoal.errors import ShoalError
    from shoal.testbed.build import build_testbed
    from shoal.testbed.sizes import TestbedSize

    job = json.loads(argv[0])

    def progress(phase: str, done: int, total: int) -> None:
        print(f"progress\t{phase}\t{done}\t{total}", flush=True)

    try:
        build_testbed(
            job["out"],
            TestbedSize(**job["size"]),
            int(job["seed"]),
            overwrite=bool(job["overwrite"]),
            threads=job["threads"],
            progress=progress,
            score=bool(job["score"]),
        )
    except ShoalError as exc:
        message = " ".join(str(exc).split())
        print(f"error\t{type(exc).__name__}\t{message}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
