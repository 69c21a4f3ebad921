"""How much of everything ``python -m benchmarks.benchmark`` measures: ``--quick`` or the full run."""

import argparse
from dataclasses import dataclass

OVERLOAD_CONCURRENCY = 64


@dataclass(frozen=True)
class Plan:
    quick: bool
    requests: int  # per e2e measurement point
    duration_s: float  # per e2e measurement point
    batches: tuple[int, ...]  # crops per raw call
    compare_batches: tuple[int, ...]  # crops per call for the torch and precision comparisons
    engine_budget_s: float  # per raw batch size
    engine_min_calls: int
    ab_rounds: int  # interleaved rounds of A/B comparisons
    preprocess_reps: tuple[int, int]  # small, 12 MP
    overload_requests: int
    overload_duration_s: float
    agreement_digits: int

    @property
    def recheck_batches(self) -> tuple[int, int]:
        return self.batches[0], self.batches[-1]

    @property
    def recheck_s(self) -> float:
        return 0.7 if self.quick else 2.5

    @classmethod
    def make(cls, args: argparse.Namespace) -> "Plan":
        quick = args.quick
        requests = args.requests or (12 if quick else 128)
        duration = args.duration or (8.0 if quick else 30.0)
        batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else (10, 40, 80)
        return cls(
            quick=quick,
            requests=requests,
            duration_s=duration,
            batches=batches,
            # One image's ten crops always; the largest batch too, unless quick.
            compare_batches=batches[:1] if quick or len(batches) == 1 else (batches[0], batches[-1]),
            engine_budget_s=1.0 if quick else 6.0,
            engine_min_calls=2 if quick else 5,
            ab_rounds=2 if quick else 4,
            preprocess_reps=(8, 3) if quick else (40, 10),
            overload_requests=max(OVERLOAD_CONCURRENCY, requests * 16) if quick else 20_000,
            overload_duration_s=min(duration, 4.0 if quick else 10.0),
            agreement_digits=10 if quick else 200,
        )
