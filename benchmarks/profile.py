"""Startup profile: cold start with and without it, and how many reads block on the network.

    python -m benchmarks.profile [--runs 5]

On a private stack: the Debian python3 image under two names, one never
profiled and one profiled once with `imagestream profile`. Each run empties
the node and zonal caches, then runs a Python program importing a set of
standard modules and counts the node's blocking fetches (foreground reads
that had to go upstream themselves). Writes docs/benchmarks/profile.{json,md}.
"""

from __future__ import annotations

import argparse
import os

from benchmarks.harness import CACHE, ROOT, cli, median_of, private_stack, timed, write_report

PROGRAM = ("import json, sqlite3, decimal, email.parser, asyncio, http.server, logging, argparse, "
           "xml.etree.ElementTree, csv, zipfile; print('ok')")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from imagestream_dev import imagebuild
    from imagestream.rpc.client import node_status
    from imagestream_dev.stack import local

    image = imagebuild.build_debian_python(CACHE, CACHE / "images", fmt="oci")
    r: dict = {"runs": args.runs, "program": PROGRAM}
    with private_stack(port_base=20800):
        cli("push", "-q", str(image), "bench/plain")
        cli("push", "-q", str(image), "bench/profiled")
        cli("profile", "bench/profiled", "--", "python3", "-c", PROGRAM)
        os.environ["IMAGESTREAM_PROFILE"] = "never"  # measure; do not record
        for label, name in (("without_profile", "bench/plain"), ("with_profile", "bench/profiled")):
            blocking: list[int] = []

            def run_once() -> float:
                seconds = timed(lambda: cli("run", name, "--", "python3", "-c", PROGRAM))
                blocking.append(node_status().blocking_fetches)
                return seconds

            r[label] = median_of(args.runs, run_once, before=local.empty_caches)
            r[label]["blocking_fetches"] = blocking
    import statistics

    m = {k: (r[k]["median"], statistics.median(r[k]["blocking_fetches"])) for k in ("without_profile", "with_profile")}
    table = [
        ("cold start (node and zonal caches empty), loopback", "time to exit", "blocking fetches"),
        ("without a startup profile", f"{m['without_profile'][0]:.2f} s", f"{m['without_profile'][1]:.0f}"),
        ("with the startup profile", f"{m['with_profile'][0]:.2f} s", f"{m['with_profile'][1]:.0f}"),
        ("ratio with / without", f"{m['with_profile'][0] / m['without_profile'][0]:.2f}",
         f"{m['with_profile'][1] / max(m['without_profile'][1], 1):.2f}"),
    ]
    write_report("profile", r, table, ROOT / "docs" / "benchmarks")


if __name__ == "__main__":
    main()
