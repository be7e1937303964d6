"""One rank of the distributed test harness (see harness.py); a long-lived process.

It imports torch once, then serves tasks read as JSON lines on stdin: join a fresh gloo
group through a file store, run ``module:function(**kwargs)``, leave the group, answer
one JSON line. The protocol stream is a private copy of stdout; the task's own prints go
to stderr, which the harness keeps in a log file. SIGUSR1 dumps every thread's stack to
that log, which is how a hung rank's traceback reaches the failing test.
"""

from __future__ import annotations

import datetime
import faulthandler
import importlib
import json
import os
import signal
import sys
import traceback

proto = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # anything the task prints goes to the log, not into the protocol
sys.stdout = sys.stderr
faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402  (after the fd set-up, so import-time prints are logged too)
import torch.distributed as dist  # noqa: E402

torch.set_num_threads(1)


def serve() -> None:
    for line in sys.stdin:
        task = json.loads(line)
        if task.get("cmd") == "exit":
            return
        reply: dict
        try:
            module_name, fn_name = task["fn"].split(":")
            fn = getattr(importlib.import_module(module_name), fn_name)
            dist.init_process_group(
                "gloo",
                init_method=f"file://{task['store']}",
                rank=task["rank"],
                world_size=task["world"],
                timeout=datetime.timedelta(seconds=task["timeout"]),
            )
            try:
                result = fn(**task["kwargs"])
            finally:
                dist.destroy_process_group()
            reply = {"ok": True, "result": result}
        except BaseException:  # noqa: BLE001 - every failure goes back to the test
            reply = {"ok": False, "error": traceback.format_exc()}
        print(f"--- task {task['fn']} done ---", file=sys.stderr, flush=True)
        proto.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    serve()
