"""`python3 deploy/lab up|down|bench`: the scale-out lab from the command line (as root).

    python3 deploy/lab up --hosts 3 --balancer haproxy --workdir /tmp/forkd-lab
        ... prints the balancer's URL and the hosts' control endpoints, then waits;
        Ctrl-C (or `down` from another shell) tears everything down.
    python3 deploy/lab down --workdir /tmp/forkd-lab
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `lab` below, run as a file

from lab import REPO, Lab, LabError, finish_hey, start_hey  # noqa: E402


def bench(lab: Lab, seconds: float, rounds: int) -> int:
    """hey -c 32 through the balancer and straight at one host, interleaved so both see
    the same background load; prints each run and the median ratio."""
    targets = [("balancer", lab.url + "/"), ("web1 direct", f"http://{lab.hosts[0].bind}/")]
    rates: dict[str, list[float]] = {label: [] for label, _ in targets}
    for round_ in range(1, rounds + 1):
        for label, url in targets:
            result = finish_hey(start_hey(url, seconds))
            rates[label].append(result.rps)
            print(f"round {round_} {label}: {result.rps:.0f} req/s, {result.failed} failed",
                  flush=True)
    ratios = sorted(b / d for b, d in zip(rates["balancer"], rates["web1 direct"], strict=True))
    print(f"balancer / direct, median of {rounds}: {ratios[len(ratios) // 2]:.2f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="deploy/lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "bench"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/forkd-lab"))
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--balancer", choices=["haproxy", "nginx"], default="haproxy")
    parser.add_argument("--drain-delay", type=float, default=None)
    parser.add_argument("--seconds", type=float, default=5, help="bench: each hey run's length")
    parser.add_argument("--rounds", type=int, default=3,
                        help="bench: balancer and direct runs, interleaved")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.command == "down":
        Lab.down_from(args.workdir)
        return 0
    # bench compares with one host reached directly, which a PROXY-expecting host refuses
    lab = Lab(args.workdir, args.hosts, args.balancer, args.workers, args.drain_delay,
              want_proxy_protocol=args.command != "bench")
    try:
        lab.up()
    except LabError as exc:
        print(f"deploy/lab: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"balancer {lab.balancer}: {lab.url}/")
        for host in lab.hosts:
            print(f"{host.name}: http://{host.bind}/  control {host.control}  "
                  f"netns {host.netns}  log {host.log_path}")
        print(f"control keys: FORKD_CONTROL_KEYS={lab.keys}")
        if args.command == "bench":
            return bench(lab, args.seconds, args.rounds)
        print("Ctrl-C tears the lab down.")
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        lab.down()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
