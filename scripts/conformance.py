"""Replay the golden fixture of official outputs through the harness and print the comparison.

    python scripts/conformance.py                      # fixture at ../shared/conformance
    python scripts/conformance.py --fixture DIR --json results/conformance.json

Every case runs on the per-site path, and also on the fused cached step where the method has one.
Prints a Markdown table (max abs difference of the final latents, relative to max |latent|,
bit-identical or not, full-step schedules) and optionally writes it as JSON with the machine it
ran on. Exit status 1 when a per-site case is not bit-identical (on a CPU whose kernels reproduce
the fixture's plain DiT; elsewhere when it exceeds the tolerance, as printed first) or a fused one
exceeds the tolerance, or a schedule differs; 2 when the fixture is missing. The same checks run
in tests/test_conformance.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # before torch starts: see rfc.tools.conformance

import torch  # noqa: E402

from rfc.tools.conformance import (  # noqa: E402
    PROBE_CASE,
    RELATIVE_TOLERANCE,
    REPO_ROOT,
    Fixture,
    case_paths,
    fixture_dir,
    probe_platform,
    run_case,
)
from rfc.utils.files import atomic_write_text  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", type=Path, default=None, help="fixture folder (default: $RFC_CONFORMANCE "
                        "or ../shared/conformance)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    folder = args.fixture or fixture_dir()
    if not (folder / "fixture.json").is_file():
        print(f"error: no conformance fixture at {folder} (fixture.json missing); pass --fixture DIR", file=sys.stderr)
        return 2
    if args.json is not None and not args.json.parent.is_dir():
        print(f"error: --json: folder {args.json.parent} does not exist", file=sys.stderr)
        return 2
    fixture = Fixture(folder)
    cpu = probe_platform(fixture)
    print(cpu.describe() + "\n")
    rows, ok = [], True
    print("| case | path | max abs diff | rel. to max abs latent | bit-identical | full steps (every block) "
          "| NFC (block 0 full) | schedule as official |")
    print("|---|---|---|---|---|---|---|---|")
    for case, fused in case_paths():
        start = time.perf_counter()
        r = cpu.probe if (case.name, fused) == (PROBE_CASE, False) else run_case(fixture, case, fused)
        passed = r.passed(cpu.exact)
        ok &= passed
        rows.append({**asdict(r), "about": case.about, "seconds": round(time.perf_counter() - start, 2),
                     "passed": passed})
        print(f"| {case.name} | {r.path} | {r.max_abs:.3g} | {r.rel:.2g} | {'yes' if r.bit_identical else 'no'} "
              f"| {len(r.full_steps)} | {r.nfc} | {'yes' if r.same_full_blocks else 'NO'} |", flush=True)
    per_site = "bit-identical" if cpu.exact else f"{RELATIVE_TOLERANCE:g} x max |latent| (this CPU, see above)"
    print(f"tolerance for fused paths: {RELATIVE_TOLERANCE:g} x max |latent|; per-site paths: {per_site}")
    if args.json is not None:
        meta = {"fixture": os.path.relpath(folder.resolve(), REPO_ROOT),
                "machine": f"{platform.machine()} CPU, 1 thread", "torch": torch.__version__,
                "python": platform.python_version(), "tolerance_rel": RELATIVE_TOLERANCE,
                "cpu_reproduces_fixture": cpu.exact, "per_site_rule": cpu.describe()}
        atomic_write_text(args.json, json.dumps({"meta": meta, "cases": rows}, indent=1) + "\n")
        print(f"written: {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
