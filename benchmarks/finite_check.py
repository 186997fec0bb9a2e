"""What `check_finite` costs per online step, timed with more rounds than `run.py` gives its long BERT steps.

python benchmarks/finite_check.py            # BERT-base -> 6 layers and ViT -> MobileNetV2, 4 rounds each
python benchmarks/finite_check.py --rounds 1 --quick

Rounds alternate the online KD step with and without the check (same student start, teacher, data and losses as
`run.py`), so a slow spell of the machine falls on both; prints one JSON line of the per-pair medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

from run import PAIRS, SHAPES, train_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="run.py's small shapes: a spot check")
    options = parser.parse_args()
    shape = SHAPES["quick" if options.quick else "full"]
    results = {}
    for name, make_pair in PAIRS.items():
        teacher, student, data, losses = make_pair(shape, options.quick)
        initial = {key: value.clone() for key, value in student.state_dict().items()}
        steps = {True: [], False: []}
        with tempfile.TemporaryDirectory() as scratch:
            for _ in range(options.rounds):
                for checked in (True, False):
                    student.load_state_dict(initial)
                    steps[checked] += train_steps(student, teacher, data, losses, shape, scratch, check_finite=checked)
        checked, unchecked = statistics.median(steps[True]), statistics.median(steps[False])
        results[name] = {"checked_step_s": checked, "unchecked_step_s": unchecked, "ratio": checked / unchecked,
                         "steps_each": len(steps[True])}  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    main()
