"""Gallery search at scale: latency and memory of the service's index (FAISS IndexIDMap over
IndexFlatL2, 4096-d fc7 vectors) for synthetic galleries, what one add costs in its SQLite store
(one row appended) and what opening a gallery costs (each process reads every vector once). Prints JSON.

    python -m benchmarks.gallery --sizes 10000 100000 --queries 200

Synthetic vectors: non-negative and sparse like fc7 after ReLU (about half the units zero); the
scan's cost depends on the sizes only, not on the values.
"""

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from service.gallery import Gallery

DIM = 4096


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def vectors(n: int, rng: np.random.Generator) -> np.ndarray:
    out = rng.random((n, DIM), dtype=np.float32)
    out[out < 0.5] = 0.0
    return out


def store_costs(directory: Path, size: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """What one add costs in a gallery of ``size`` items (one row appended, whatever the size), and
    what opening that gallery costs (every vector read into the index, once per process)."""
    gallery = Gallery(directory, "bench", "0" * 64, DIM, max_items=size + 1)
    gallery._ready(create=True)
    with gallery._connect() as db, gallery._transaction(db):  # filled in one transaction: quicker
        for start in range(0, size, 10_000):
            chunk = vectors(min(10_000, size - start), rng)
            gallery._insert(db, [(f"v{start + i}", None, "", v, None) for i, v in enumerate(chunk)])
    t = time.perf_counter()
    gallery.add("one-more", None, vectors(1, rng)[0], b"")
    add_ms = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    Gallery(directory, "bench", "0" * 64, DIM, max_items=size + 1)
    open_s = time.perf_counter() - t
    return add_ms, open_s, sum(p.stat().st_size for p in directory.iterdir()) / 2**20


def measure(size: int, queries: int, k: int, seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    before = rss_mib()
    index = faiss.IndexIDMap(faiss.IndexFlatL2(DIM))
    started = time.perf_counter()
    for start in range(0, size, 10_000):  # in chunks: the synthetic data itself is not kept
        chunk = vectors(min(10_000, size - start), rng)
        index.add_with_ids(chunk, np.arange(start, start + len(chunk), dtype=np.int64))
    build_s = time.perf_counter() - started
    after = rss_mib()
    probes = vectors(queries, rng)
    index.search(probes[:1], k)  # warm-up
    latencies = []
    for probe in probes:  # one query per call, as POST /similar makes them
        t = time.perf_counter()
        index.search(probe.reshape(1, -1), k)
        latencies.append((time.perf_counter() - t) * 1000)
    del index
    with tempfile.TemporaryDirectory() as tmp:
        add_ms, open_s, file_mib = store_costs(Path(tmp), size, rng)
    return {
        "vectors": size,
        "build_s": round(build_s, 2),
        "search_ms_p50": round(float(np.percentile(latencies, 50)), 2),
        "search_ms_p95": round(float(np.percentile(latencies, 95)), 2),
        "queries": queries,
        "k": k,
        "index_mib": round(size * DIM * 4 / 2**20, 1),
        "rss_growth_mib": round(after - before, 1),
        "add_ms": round(add_ms, 1),
        "open_s": round(open_s, 2),
        "file_mib": round(file_mib, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="FAISS (OpenMP) threads; 0 = its default")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    results = [measure(size, args.queries, args.k, args.seed) for size in args.sizes]
    print(
        json.dumps(
            {
                "index": "IndexIDMap(IndexFlatL2), exact",
                "dim": DIM,
                "faiss": faiss.__version__,
                "threads": faiss.omp_get_max_threads(),
                "cpu_count": os.cpu_count(),
                "machine": platform.machine(),
                "load_average_1min": round(os.getloadavg()[0], 1),  # other work on the machine meanwhile
                "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "results": results,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
