"""CF-1.8 compliance of kerasntk results files with the IOOS compliance checker (`compliance-checker`,
in the `test` extra). Offline: the checker uses its packaged CF standard-name table (it downloads one only
when a file names a `standard_name_vocabulary`, which kerasntk files do not).

    python benchmarks/cf_check.py RUN_DIR/results.nc [more.nc ...]

Prints each file's score, its high-priority failures and the checker's own errors; exits 1 when a file
has a high-priority failure other than those the results schema forces (FORCED, README "Results").
"""

import argparse
import sys

from compliance_checker.suite import CheckSuite

CHECKER = "cf:1.8"

# high-priority sections the schema fails on purpose: CF reserves a dimension named `time` for calendar
# time (standard_name "time", units "<unit> since <date>"); kerasntk's `time` counts training epochs
FORCED = {"§5.1 Independent Latitude, Longitude, Vertical, and Time Axes":
          "`time` is training time in epochs (units 1), not a calendar time"}


def check(path):
    """(scored points, possible points, {section: messages} of failed high-priority sections,
    {check: error} of checks that crashed) for the NetCDF file at `path`."""
    suite = CheckSuite()
    suite.load_all_available_checkers()
    ds = suite.load_dataset(path)
    try:
        groups, errors = suite.run_all(ds, [CHECKER])[CHECKER]
    finally:
        ds.close()
    report = suite.build_structure(CHECKER, groups, path)
    failures = {r.name: sorted(set(r.msgs)) for r in report["high_priorities"] if r.value[0] < r.value[1]}
    return report["scored_points"], report["possible_points"], failures, {k: str(e) for k, (e, _) in errors.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="NetCDF files (e.g. RUN_DIR/results.nc)")
    unexpected = 0
    for path in parser.parse_args(argv).paths:
        scored, possible, failures, errors = check(path)
        print(f"{path}: {CHECKER} {scored}/{possible}, {len(failures)} high-priority section(s) failing")
        for section, messages in failures.items():
            why = FORCED.get(section)
            unexpected += why is None
            print(f"  {section}: " + (f"forced by the schema ({why})" if why else "FAIL"))
            for message in messages:
                print(f"    {message}")
        for name, error in errors.items():
            print(f"  checker error in {name} (not scored): {error}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
