#!/usr/bin/env python
"""Checks an Autobahn|Testsuite fuzzingclient report.

Usage: check_report.py REPORT_DIR SPEC_JSON [AGENT]

Fails (exit 1) unless
  * every case the spec selects has a result for AGENT (a crash or a refused
    connection makes wstest stop early and leave cases out), and
  * every case's `behavior` and `behaviorClose` is OK, NON-STRICT or
    INFORMATIONAL.

Prints the count of each behavior, the slowest cases and every failure with
the reason wstest recorded. Runs under the Python 2 that has
autobahntestsuite installed (used to list the cases the spec selects);
works under Python 3 too, but then cannot list them and says so.
"""

from __future__ import print_function

import collections
import json
import os
import sys

PASSING = ("OK", "NON-STRICT", "INFORMATIONAL")


def expected_cases(spec):
    """The case ids the spec selects, as wstest resolves them (or None)."""
    try:
        from autobahntestsuite.caseset import CaseSet
        from autobahntestsuite.case import (Cases, CaseSetname, CaseBasename,
                                            CaseCategories, CaseSubCategories)
    except ImportError:
        return None
    cs = CaseSet(CaseSetname, CaseBasename, Cases, CaseCategories, CaseSubCategories)
    return cs.parseSpecCases(spec)


def case_key(case_id):
    return tuple(int(p) for p in case_id.split("."))


def main(argv):
    if len(argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    report_dir, spec_path = argv[1], argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    agent = argv[3] if len(argv) > 3 else spec["servers"][0]["agent"]

    index_path = os.path.join(report_dir, "index.json")
    if not os.path.exists(index_path):
        print("FAIL: no report at %s (wstest did not finish)" % index_path)
        return 1
    with open(index_path) as f:
        index = json.load(f)
    results = index.get(agent)
    if not results:
        print("FAIL: the report has no results for agent %r" % agent)
        return 1

    problems = []
    expected = expected_cases(spec)
    if expected is None:
        print("note: autobahntestsuite not importable here; not checking that every case ran")
    else:
        missing = sorted(set(expected) - set(results), key=case_key)
        if missing:
            problems.append("%d case(s) have no result (wstest stopped early?): %s%s" % (
                len(missing), " ".join(missing[:20]), " ..." if len(missing) > 20 else ""))

    counts = collections.Counter()
    close_counts = collections.Counter()
    lenient = collections.defaultdict(list)
    failed = []
    for case_id in sorted(results, key=case_key):
        r = results[case_id]
        counts[r["behavior"]] += 1
        close_counts[r["behaviorClose"]] += 1
        if r["behavior"] in PASSING[1:]:
            lenient[r["behavior"]].append(case_id)
        if r["behavior"] not in PASSING or r["behaviorClose"] not in PASSING:
            detail = ""
            try:
                with open(os.path.join(report_dir, r["reportfile"])) as f:
                    c = json.load(f)
                detail = "%s | close: %s" % (c.get("result", ""), c.get("resultClose", ""))
            except (IOError, OSError, ValueError, KeyError):
                pass
            failed.append("  %-10s behavior=%s behaviorClose=%s remoteCloseCode=%s %s" % (
                case_id, r["behavior"], r["behaviorClose"], r.get("remoteCloseCode"), detail))

    print("Autobahn results for %s: %d cases" % (agent, len(results)))
    print("  behavior:      " + ", ".join("%s=%d" % kv for kv in sorted(counts.items())))
    print("  behaviorClose: " + ", ".join("%s=%d" % kv for kv in sorted(close_counts.items())))
    for behavior in sorted(lenient):
        print("  %-14s %s" % (behavior + ":", " ".join(lenient[behavior])))

    # Time per top-level group and the slowest cases (durations are in ms).
    groups = collections.Counter()
    for case_id, r in results.items():
        groups[case_id.split(".")[0]] += r.get("duration", 0)
    print("  ms per group:  " + ", ".join(
        "%s=%d" % (g, groups[g]) for g in sorted(groups, key=lambda g: int(g))))
    slowest = sorted(results.items(), key=lambda kv: -kv[1].get("duration", 0))[:5]
    print("  slowest:       " + ", ".join("%s=%dms" % (k, v.get("duration", 0)) for k, v in slowest))

    if failed:
        problems.append("%d case(s) not OK, NON-STRICT or INFORMATIONAL:\n%s" % (len(failed), "\n".join(failed)))
    if problems:
        for p in problems:
            print("FAIL: " + p)
        return 1
    print("PASS: every case is OK, NON-STRICT or INFORMATIONAL")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
