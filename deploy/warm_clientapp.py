#!/usr/bin/env python3
"""A long-lived ClientApp runner for a SuperNode started with ``--isolation process``.

Why: with Flower's default (``flower-supernode --isolation subprocess``) the SuperNode starts a
``flower-superexec`` that polls the SuperNode's Runtime API and, for **every** message, spawns a
fresh ``flwr-clientapp --token T`` process (``flwr/supercore/superexec/executor/subprocess_executor.py``).
That process imports Flower, torch and the app, installs the FAB, runs the one message and exits
(``flwr/supernode/runtime/run_clientapp.py`` ends in ``flwr_exit``): every message pays the
interpreter + imports + model loading again. ``--isolation process`` only stops the SuperNode
from starting the SuperExec; Flower 1.41 ships nothing that keeps a ClientApp process alive:
``flwr-clientapp`` requires a per-task ``--token`` and runs exactly once.

This runner takes the SuperExec's and ``flwr-clientapp``'s place in one process: it claims
ClientApp tasks on the SuperNode's Runtime API (``AcquireTask``, as ``flower-superexec`` does)
and runs each with the same steps as ``run_clientapp`` (pull the message, context, run and FAB;
install the FAB; load the ClientApp; call it; push the reply and the context back), in a loop.
Imports, the app's module-level caches (the pretrained encoder, tokenizer and data
``lru_cache`` s) stay warm across messages and runs, as they do in a simulation's Ray workers.

What stays as in Flower: one task at a time, the per-task token, task heartbeats, the context
round trip (``context.state`` lives in the SuperNode, not here), an ``Error`` reply when the app
raises. What differs: the app's code is imported once; when a task comes with a FAB hash other than
the one loaded, the runner re-executes itself (a fresh interpreter, the task's claim handed over)
before running it, so a new app version is never served by old code. A crash of the app's process takes every later message
down with it until it is restarted (``deploy/start-supernode.sh --warm-clientapp`` ends the
SuperNode too, so a supervisor restarts both).

Usage (beside ``flower-supernode --isolation process --port 9094 ...``)::

    python deploy/warm_clientapp.py --runtime-api-address 127.0.0.1:9094 --insecure \\
        [--parent-pid SUPERNODE_PID] [--poll-interval 0.2] [--preload torch,transformers] [--timing-log FILE]

Uses Flower's internal modules; checked with flwr 1.41.0 only (it refuses other versions unless
``--any-flwr-version``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path

TESTED_FLWR = "1.41.0"


def _now() -> float:
    return time.time()


class TimingLog:
    """One JSON line per task (when ``--timing-log`` is given); see benchmarks/supernode_startup.py."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def write(self, record: dict) -> None:
        if not self.path:
            return
        line = json.dumps(record) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Long-lived ClientApp runner for `flower-supernode --isolation process`.")
    p.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                   help="the SuperNode's Runtime API, HOST:PORT (its --host/--port; default 127.0.0.1:9094)")
    p.add_argument("--insecure", action="store_true",
                   help="plain HTTP to the Runtime API (the SuperNode's default when it has no --ssl-* files)")
    p.add_argument("--root-certificates", default=None, help="CA file, when the Runtime API uses TLS")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    p.add_argument("--poll-interval", type=float, default=0.2,
                   help="seconds between AcquireTask polls when idle (flower-superexec: 1.0)")
    p.add_argument("--timing-log", default=os.environ.get("PWFF_CLIENTAPP_TIMING_LOG") or None,
                   help="append one JSON line of timestamps per task (default $PWFF_CLIENTAPP_TIMING_LOG)")
    p.add_argument("--preload", default=os.environ.get("PWFF_WARM_PRELOAD", ""),
                   help="comma-separated modules to import before the first task, e.g. torch,transformers "
                        "(default $PWFF_WARM_PRELOAD): the first message then does not pay for them. "
                        "Name third-party modules only: the app's own package is imported from the FAB")
    p.add_argument("--any-flwr-version", action="store_true", help=f"run with a flwr other than {TESTED_FLWR}")
    # Internal: set when the runner re-executes itself for a task of a new FAB.
    p.add_argument("--resume-token", default=None, help=argparse.SUPPRESS)
    p.add_argument("--resume-task-id", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--resume-fab-hash", default=None, help=argparse.SUPPRESS)
    p.add_argument("--resume-acquired", type=float, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = _now()
    args = _parse_args(argv)

    import flwr  # noqa: PLC0415 (imports after the arguments parse: --help stays fast)

    if flwr.__version__ != TESTED_FLWR and not args.any_flwr_version:
        print(f"warm_clientapp.py: written against flwr {TESTED_FLWR} internals, found {flwr.__version__} "
              "(--any-flwr-version to try anyway)", file=sys.stderr)
        return 2

    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore import log
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime import run_clientapp as rc

    certificates = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
    timing = TimingLog(args.timing_log)

    def make_client(token: str | None, retry) -> RuntimeHttpClient:
        interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=args.runtime_api_address, insecure=args.insecure,
            root_certificates=certificates, interceptors=interceptors, retry_invoker=retry)

    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # SIGINT to us when the SuperNode is gone

    stopping = {"flag": False}

    def on_term(signum, _frame) -> None:
        if stopping["flag"]:
            return
        stopping["flag"] = True
        raise KeyboardInterrupt  # leaves a running task through its `finally` (status FAILED pushed)

    signal.signal(signal.SIGTERM, on_term)

    load_client_app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    installed: set[str] = set()
    loaded_fab: dict[str, str | None] = {"hash": None}
    served = 0

    def run_task(token: str, task_id: int, acquired: float, fab_hash: str) -> None:
        """Run one claimed task with the steps of flwr's run_clientapp, without exiting."""
        nonlocal served
        retry = make_simple_http_retry_invoker()
        client = make_client(token, retry)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        record = {"runner": "warm", "pid": os.getpid(), "task_id": task_id, "start": acquired,
                  "process_start": started, "served_before": served}
        message = context = reply = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, run, fab = rc.pull_task_input(client)
            record["type"] = message.metadata.message_type
            if fab.hash_str not in installed:
                install_from_fab(fab.content, skip_prompt=True)
                installed.add(fab.hash_str)
            client_app = load_client_app(run.fab_id, run.fab_version, fab.hash_str)
            loaded_fab["hash"] = fab_hash or fab.hash_str
            record["call"] = _now()
            reply = client_app(message=message, context=context)
            record["called"] = _now()
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # pylint: disable=broad-exception-caught
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            if isinstance(ex, LoadClientAppError):
                reason = "An exception was raised when attempting to load `ClientApp`"
                code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            log(ERROR, "ClientApp raised an exception", exc_info=ex)
            sub_status, details = SubStatus.FAILED, reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    rc.push_message(client, reply, context)
                    record["pushed"] = _now()
            except Exception as ex:  # pylint: disable=broad-exception-caught
                log(ERROR, "Failed to push reply message", exc_info=ex)
            retry.max_tries = 1  # as flwr's on_exit: do not block on the final status
            rc.push_task_output(client=client, context=context, sub_status=sub_status, details=details)
            heartbeat.stop()
            client.close()
            record["done"] = _now()
            record["status"] = str(sub_status)
            timing.write(record)
            served += 1
        log(INFO, "[warm-clientapp] task %d (%s) %s in %.2f s", task_id, record.get("type"), sub_status,
            record["done"] - acquired)

    def reexec(token: str, task_id: int, acquired: float, fab_hash: str) -> None:
        """A task for another app version: a fresh interpreter runs it (the claim and token carry over)."""
        log(WARNING, "[warm-clientapp] task %d is for app %s, loaded: %s; restarting the runner",
            task_id, fab_hash[:12], (loaded_fab["hash"] or "")[:12])
        keep = _strip_resume(list(argv if argv is not None else sys.argv[1:]))
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *keep,
                                  "--resume-token", token, "--resume-task-id", str(task_id),
                                  "--resume-fab-hash", fab_hash, "--resume-acquired", repr(acquired)])

    for name in filter(None, (m.strip() for m in args.preload.split(","))):
        t = _now()
        try:
            importlib.import_module(name)
            log(INFO, "[warm-clientapp] preloaded %s in %.1f s", name, _now() - t)
        except Exception as ex:  # pylint: disable=broad-exception-caught
            log(WARNING, "[warm-clientapp] could not preload %s: %s", name, ex)
    log(INFO, "[warm-clientapp] serving ClientApp tasks of %s (pid %d)", args.runtime_api_address, os.getpid())
    acquirer = make_client(None, make_simple_http_retry_invoker())
    try:
        if args.resume_token is not None:
            run_task(args.resume_token, args.resume_task_id, args.resume_acquired or started,
                     args.resume_fab_hash or "")
        while not stopping["flag"]:
            res = acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                acquired = _now()
                fab_hash = res.task.fab_hash
                if loaded_fab["hash"] is not None and fab_hash and fab_hash != loaded_fab["hash"]:
                    acquirer.close()
                    reexec(res.token, res.task.task_id, acquired, fab_hash)
                run_task(res.token, res.task.task_id, acquired, fab_hash)
                continue  # look for the next one at once
            time.sleep(args.poll_interval)
    except KeyboardInterrupt:
        stopping["flag"] = True
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second signal must not cut the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        acquirer.close()
    log(INFO, "[warm-clientapp] stopped after %d tasks", served)
    return 0


def _strip_resume(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("--resume-token", "--resume-task-id", "--resume-fab-hash", "--resume-acquired"):
            skip = True
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
