"""Read throughput of NIfTI volumes from local disk and from an S3 API (a local moto server).

Prints one row per (storage, preset, format): the median over ``--repeats`` reads of
``caldm.data.io.read_volume`` (fetch + gunzip + decode + checks), as MB/s of decoded voxel
data (uint8 phantom volumes, so 1 byte per voxel) and of bytes stored.

    python benchmarks/read_throughput.py [--presets tiny small] [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time

from caldm.config import preset
from caldm.data.io import read_bytes, read_volume, write_volume
from caldm.data.phantom import make_phantom


def start_s3() -> str:
    """Start a moto S3 server on 127.0.0.1, point the AWS variables at it, return a bucket."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("caldm-bench")
    return "s3://caldm-bench"


def median_seconds(url: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        read_volume(url)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    roots = {"local": tempfile.mkdtemp(prefix="caldm-bench-"), "s3 (moto)": start_s3()}
    print(
        f"{'storage':<10} {'preset':<6} {'shape':<16} {'format':<7} "
        f"{'stored MB':>9} {'median s':>9} {'voxel MB/s':>10} {'stored MB/s':>11}"
    )
    for storage, root in roots.items():
        for name in args.presets:
            shape = preset(name).model.image_shape
            image, _, _ = make_phantom(shape, seed=0)
            for suffix in (".nii", ".nii.gz"):
                url = f"{root}/{name}{suffix}"
                write_volume(url, image)
                stored = len(read_bytes(url)) / 1e6
                seconds = median_seconds(url, args.repeats)
                print(
                    f"{storage:<10} {name:<6} {'x'.join(map(str, shape)):<16} {suffix:<7} "
                    f"{stored:>9.2f} {seconds:>9.4f} {image.nbytes / 1e6 / seconds:>10.1f} "
                    f"{stored / seconds:>11.1f}"
                )


if __name__ == "__main__":
    main()
