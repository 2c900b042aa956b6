"""The run's kernel: one kernel for all the stages of a run, started before anything else so that it
boots (and imports lib) while the runner imports the rest and starts the services; the ipykernel it
starts (lib/kernel.py) and what it preloads. `run_pipeline.py` starts it right after reading its
arguments, before importing papermill and the services' clients (lib/runner.py), which is why this
module imports only the record's and the settings' modules."""

from __future__ import annotations

import ast
import logging
import os
import time

from lib import config, registry, runs

log = logging.getLogger(__name__)

# The kernel's own start-up warnings (loopback TCP transport) are noise in a run's output. IPython's
# input history (an SQLite file, written by a thread of its own and opened anew by every reset) is
# of no use to a notebook executed headless: its executed cells are in the notebook itself.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR", "--HistoryManager.enabled=False"]
# What the stage notebooks import, imported by a warm kernel while the runner starts the services:
# lib, and matplotlib for the gold notebook's chart (~0.5 s that stage 5 would otherwise wait for).
PRELOAD = f"import {', '.join(s.module for s in registry.STAGES)}; import matplotlib.pyplot"


def kernel_specs():
    """jupyter_client's kernel spec finder, looking where it looks by default: the Jupyter data folders,
    then IPython's own (`$IPYTHONDIR` or ~/.ipython). Its default finds IPython's folder by importing
    IPython (~0.15 s of the runner's CPU), which the runner has no other use for."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_core.paths import jupyter_path

    ipython_dir = os.path.expanduser(os.environ.get("IPYTHONDIR") or os.path.join("~", ".ipython"))
    return KernelSpecManager(kernel_dirs=[*jupyter_path("kernels"), os.path.join(ipython_dir, "kernels")])


def without_debugger(spec) -> None:
    """An ipykernel spec (`python -m ipykernel_launcher …`) starts `lib/kernel.py` instead: the same
    kernel without debugpy, ~0.07 s less of every run's critical path. Other kernels are left as they are."""
    if spec is not None and spec.argv[1:3] == ["-m", "ipykernel_launcher"]:
        spec.argv[1:3] = ["-m", "lib.kernel"]


# A kernel keeps most of what a large stage allocated (Python's and the allocators' free lists are
# not handed back to the system), so the stages of a big run would add up in one process: past this
# size after a stage, the next stage gets a fresh kernel. Small runs never reach it.
RECYCLE_MIB = 512


class Kernels:
    """One kernel for the stages of a run, instead of one per stage: starting a kernel and importing
    lib costs more CPU than a 250-record stage does. It is started (and imports lib, ipykernel's
    exec_lines) before the first stage needs it, and every notebook begins with its namespace,
    history and execution count reset. A stage that fails or is interrupted ends the run, and
    the kernel with it. A kernel that cannot be started here is left to papermill, which starts
    its own and reports any failure as usual."""

    def __init__(self, name: str, run_id: str):
        self.name, self.run_id, self.km = name, run_id, None
        self.kc = None  # the client the stages share, connected by the first one (lib/runner.py _warm_engine)

    def start(self) -> None:
        if self.km is not None:
            return
        from jupyter_client.manager import AsyncKernelManager
        from jupyter_core.utils import run_sync

        km = AsyncKernelManager(kernel_name=self.name, kernel_spec_manager=kernel_specs())
        try:
            without_debugger(km.kernel_spec)
            # RUNNER_ENV tells `context.begin` in the kernel that the runner owns this run's record.
            run_sync(km.start_kernel)(extra_arguments=[*KERNEL_ARGUMENTS, f"--IPKernelApp.exec_lines={PRELOAD}"],
                                      cwd=str(config.ROOT), env={**os.environ, runs.RUNNER_ENV: self.run_id})
        except Exception as err:  # noqa: BLE001 - papermill will start one and report why it cannot
            log.debug("could not start a %s kernel ahead: %s", self.name, err)
            return
        self.km = km

    def take(self):
        """The kernel for the stage about to run, or None (papermill starts one). A kernel that has
        died, or that a large stage left bigger than RECYCLE_MIB, is replaced first."""
        from jupyter_core.utils import run_sync

        if self.km is not None and not run_sync(self.km.is_alive)():
            self.close()
        elif self.km is not None and (rss := self.rss()) > RECYCLE_MIB * 2**20:
            log.info("kernel holds %d MiB after the last stage: the next stage gets a new one", rss >> 20)
            self.close()
        self.start()
        return self.km

    def draw_trends(self, outputs, timeout: float = 60.0):
        """Have the kernel, idle after the last stage and with matplotlib imported for the gold chart,
        draw the run index's trend pictures (lib/report.py `trends`) while this process writes the
        report: a function is returned that waits for them (picture → file name), or for None, when
        there is no kernel or it could not draw them (the caller draws them then)."""
        if self.kc is None or self.km is None:
            return lambda: None
        code = f"import lib.report\n_medallion_trends = lib.report.trends({str(outputs)!r})"
        try:
            msg_id = self.kc.execute(code, store_history=False, user_expressions={"trends": "_medallion_trends"})
        except Exception as err:  # noqa: BLE001 - drawn by the caller instead
            log.debug("kernel could not be asked for the trends: %s", err)
            return lambda: None

        def wait():

            from jupyter_core.utils import run_sync

            deadline = time.monotonic() + timeout
            try:
                while (left := deadline - time.monotonic()) > 0:
                    reply = run_sync(self.kc.get_shell_msg)(timeout=left)
                    if reply.get("parent_header", {}).get("msg_id") != msg_id:
                        continue
                    value = reply["content"].get("user_expressions", {}).get("trends", {})
                    if reply["content"].get("status") != "ok" or value.get("status") != "ok":
                        log.info("the kernel could not draw the trends: %s", reply["content"].get("evalue", value))
                        return None
                    pictures = ast.literal_eval(value["data"]["text/plain"])
                    return {str(k): (str(v) if v is not None else None) for k, v in pictures.items()}
            except Exception as err:  # noqa: BLE001 - drawn by the caller instead
                log.info("the kernel could not draw the trends: %s", err)
            return None

        return wait

    def process(self) -> dict | None:
        """The kernel process as a record names it (lib/runs.py `this_process`), or None."""
        import psutil

        try:
            return runs.this_process(self.km.provisioner.pid)
        except (AttributeError, TypeError, psutil.Error):
            return None

    def rss(self) -> int:
        """The kernel process's resident size in bytes (0 when it cannot be read)."""
        import psutil

        try:
            return psutil.Process(self.km.provisioner.pid).memory_info().rss
        except (AttributeError, TypeError, psutil.Error):
            return 0

    def close(self) -> None:
        km, self.km = self.km, None
        kc, self.kc = self.kc, None
        if kc is not None:
            try:
                kc.stop_channels()
            except Exception as err:  # noqa: BLE001 - already closed
                log.debug("kernel client: %s", err)
        if km is not None:
            from jupyter_core.utils import run_sync

            try:
                # Killed and reaped here: jupyter_client's own wait polls every 0.1 s, and a kernel
                # killed a moment before is still there at its first look (0.1 s of every run's end).
                run_sync(km.provisioner.kill)()
                km.provisioner.process.wait(timeout=5)
            except Exception as err:  # noqa: BLE001 - no process, already gone, or still going: shut down below
                log.debug("kernel kill: %s", err)
            try:
                run_sync(km.shutdown_kernel)(now=True)
            except Exception as err:  # noqa: BLE001 - already gone
                log.debug("kernel shutdown: %s", err)
