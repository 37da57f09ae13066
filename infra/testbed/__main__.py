"""``python -m infra.testbed up|down|status|logs [HOST] [-n LINES]|run HOST -- ARGV...``

The state directory is ``/tmp/dpt-testbed`` unless ``DPT_TESTBED_DIR`` names another.
"""

from __future__ import annotations

import sys
import time

from infra.testbed.core import HOSTS, Testbed, TestbedError

USAGE = __doc__.strip().splitlines()[0]


def table(rows: list[list], header: list[str]) -> str:
    cells = [header, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("up", "down", "status", "logs", "run"):
        print(USAGE, file=sys.stderr)
        return 2
    tb, cmd = Testbed(), argv[0]
    if cmd == "up":
        t0 = time.monotonic()
        try:
            rows = tb.up()
        except TestbedError as e:
            print(e, file=sys.stderr)
            return 1
        print(table(rows, ["service", "ready after (s)", "detail"]))
        print(f"up in {time.monotonic() - t0:.1f} s; state in {tb.state_file}")
    elif cmd == "down":
        t0 = time.monotonic()
        tb.down()
        print(f"down in {time.monotonic() - t0:.1f} s")
    elif cmd == "status":
        rows = tb.status()
        print(table([list(r.values()) for r in rows], list(rows[0])))
        print("up" if tb.is_up() else "not (fully) up")
        return 0 if tb.is_up() else 1
    elif cmd == "logs":
        lines = int(argv[argv.index("-n") + 1]) if "-n" in argv else 200
        hosts = [a for a in argv[1:] if a in HOSTS or a == "driver-setup"]
        paths = [tb.log(h) for h in hosts] or sorted((tb.dir / "logs").glob("*.log"))
        for path in paths:
            tail = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            print(f"==== {path} ====", *tail, sep="\n")
    elif cmd == "run":
        if len(argv) < 4 or argv[2] != "--" or argv[1] not in HOSTS:
            print("usage: python -m infra.testbed run HOST -- ARGV...", file=sys.stderr)
            return 2
        res = tb.run_on(argv[1], argv[3:], capture=False)
        return res.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
