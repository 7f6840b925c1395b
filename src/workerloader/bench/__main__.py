"""``python -m workerloader.bench NAME`` is ``workerloader bench NAME``."""

from ..cli._bench import bench

bench(prog_name="python -m workerloader.bench")
