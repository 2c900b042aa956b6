#!/usr/bin/env python3
"""Run the countries-medallion stages as papermill notebooks, or manage the embedded stack.

    python run_pipeline.py                      every stage, a new run id
    python run_pipeline.py --stages 2-4 --run-id ID -p write_mode=replace
    python run_pipeline.py --resume ID          continue a failed or interrupted run
    python run_pipeline.py stack up|down|status|env
    python run_pipeline.py lab                  JupyterLab on the same stack
    python run_pipeline.py report ID|--all      HTML pages of a run (report.html) and the run index
    python run_pipeline.py runs [--json]        every run, newest first
    python run_pipeline.py diff A B             countries added, removed and changed from run A to run B

A run is named by its id or, for `report` and `diff`, by a short id that fits one run only: the end of
its id as the trend pictures show it (`a1b2c3`) or its beginning.

Exit codes: 0 success, 1 a stage or preflight failed, 2 bad arguments or configuration (nothing ran),
3 another run holds the pipeline lock, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time

from lib import hints, memory  # the standard library only: hints speaks for a Python that lacks the packages

memory.tune()  # the C heap of this process, set up before its threads (lib/memory.py)

# Only what starting a run needs is imported here (~0.07 s): the run's kernel starts first and boots
# while this process imports the rest (`import_the_rest`: papermill, the services' clients, ~0.3 s).
try:
    from lib import config, files, kernels as kernels_, lab, names, params, registry, runs, terminal
    from lib.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, PipelineError
    from lib import log as logsetup
except ModuleNotFoundError as missing:  # e.g. the system `python3`, when only .venv has the packages
    if __name__ != "__main__" or (missing.name or "lib").split(".")[0] == "lib":
        raise
    print(hints.missing_packages(missing, sys.argv[1:]), file=sys.stderr)
    sys.exit(2)  # EXIT_USAGE (bad configuration, nothing ran), which needs the packages


def import_the_rest() -> None:
    """The modules every command but a run's start needs (papermill, the object store's and the
    database's clients come with them): a run imports them once its kernel is booting (`cmd_run`),
    every other command first (`main`)."""
    global parameters, record_store, runner
    from lib import record_store, runner
    from lib.stages import parameters


log = logging.getLogger("run_pipeline")


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_pipeline.py",
        description="Run the stage notebooks in order with papermill; each run is recorded in "
                    "outputs/runs/<run_id>/ (executed notebooks and manifest.json). "
                    "Other commands: `stack up|down|status|env`, `lab`, `runs`, `diff A B`, `report`, `params`, `publish`.",
        epilog="Exit codes: 0 ok, 1 failed, 2 bad arguments/configuration, 3 pipeline lock busy, 130 interrupted.")
    p.add_argument("--stages", default=registry.ALL,
                   help=f"stages to run: {registry.ALL}, 2-4, 3 or 1,3 (default {registry.ALL}: all)")
    p.add_argument("--run-id", default="", help="run id (default: a new one, like 20261128T054219Z-3fa2c1)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a notebook parameter, passed to every chosen stage that declares KEY (repeatable)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue RUN_ID from its first stage that did not succeed")
    p.add_argument("--kernel", default="python3", help="Jupyter kernel (default python3)")
    p.add_argument("--kernel-start-timeout", type=int, default=60, metavar="SECONDS",
                   help="give up when a kernel has not started after this long (default 60)")
    p.add_argument("--cell-timeout", type=int, default=600, metavar="SECONDS",
                   help="fail a stage whose cell runs longer than this (default 600)")
    p.add_argument("--wait-for-lock", type=float, default=0, metavar="SECONDS",
                   help="when another run holds the pipeline lock, wait this long before giving up (default 0)")
    p.add_argument("--html", action="store_true",
                   help="kept for old scripts: every run now ends by writing report.html and outputs/index.html")
    return p


def shown(text) -> str:
    """An error, or anything else from data or records, as printed: control characters escaped
    (lib/terminal.py), line breaks kept."""
    return terminal.safe(text, newlines=True)


def usage_error(message: str) -> int:
    print(f"run_pipeline.py: error: {shown(message)}", file=sys.stderr)
    return EXIT_USAGE


def records_in_step(command: str) -> config.Settings | None:
    """The settings, with this checkout's copy of the run records (outputs/runs) brought in step with
    the records bucket (lib/record_store.py): what other workers and checkouts recorded is pulled,
    what only this one holds is pushed, and the index is written again when a run changed. A store
    that cannot be reached is said in one line, and the command goes on with this checkout's copy
    (None)."""
    from lib import report

    try:
        env = config.environment()
        runner.ensure_stack(env)
        settings = config.settings(env)
        if record_store.sync_all(settings):
            log.info("index: %s", report.write_index(settings.outputs_dir))
        return settings
    except PipelineError as err:
        print(f"run_pipeline.py {command}: the run records of this checkout only: {shown(err)}", file=sys.stderr)
        return None


def store_marked(settings: config.Settings | None, marked: list[str]) -> None:
    """Runs that `report.sweep` marked, stored with their verdict."""
    for run_id in marked if settings is not None else []:
        record_store.push(settings, run_id)


def cmd_stack(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="run_pipeline.py stack", description="Manage the embedded stack "
                                "(SeaweedFS S3 and PostgreSQL on loopback, state under .state/).")
    p.add_argument("action", choices=["up", "down", "status", "env"])
    p.add_argument("--orphans", action="store_true",
                   help="with down: stop an orphaned stack of this project on this port base (its state "
                        "folder deleted): only our own weed and PostgreSQL servers are stopped")
    args = p.parse_args(argv)
    from lib import stack, stack_ports, stack_state

    if args.orphans and args.action != "down":
        return usage_error("--orphans goes with `stack down` only")
    env = config.environment()
    sdir = config.state_dir(env)
    try:
        logsetup.setup(config.logs_dir(env))
    except logsetup.LogWriteError as err:
        return usage_error(str(err))
    try:
        if args.action == "up":
            stack.up(sdir)
            print(json.dumps(stack.status(sdir), indent=2))
        elif args.action == "down" and args.orphans:
            stopped = stack_ports.stop_orphans(stack_state.port_base(sdir))
            for holder in stopped:
                print(f"stopped {shown(holder.describe())}")
            if not stopped:
                print(f"no orphaned stack on the ports of base {stack_state.port_base(sdir)}")
        elif args.action == "down":
            stack.down(sdir)
            print(json.dumps(stack.status(sdir), indent=2))
            left = stack_ports.holders(stack_state.port_base(sdir))
            if left:
                raise stack_state.StackError("still listening on this stack's ports: "
                                             + "; ".join(h.describe() for h in left)
                                             + (f" -- `{stack_ports.STOP_ORPHANS}` stops an orphaned stack "
                                                "of this project" if any(h.orphaned for h in left) else ""))
        elif args.action == "status":
            others = stack.others_on_ports(sdir)
            status = stack.status(sdir, others)
            print(json.dumps(status, indent=2))
            for holder in others:
                print(f"on this stack's ports: {holder.describe()}", file=sys.stderr)
            if "stop_orphans" in status:
                print(f"stop the orphaned stack with: {status['stop_orphans']}", file=sys.stderr)
        else:
            print("\n".join(stack.env_lines(sdir)))
    except stack_state.StackError as err:
        print(f"run_pipeline.py stack {args.action}: {shown(err)}", file=sys.stderr)
        return err.exit_code
    return 0


def cmd_lab(argv: list[str]) -> int:
    env = config.environment()
    runner.ensure_stack(env)
    os.chdir(config.ROOT)
    extra = ["--allow-root"] if os.geteuid() == 0 else []  # containers and CI machines often run as root
    os.execvp(sys.executable, [sys.executable, "-m", "jupyter", "lab", *extra, *lab.arguments(argv)])


def cmd_report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="run_pipeline.py report",
                                description="Render a run's report and executed notebooks as HTML, and the "
                                            "run index outputs/index.html.")
    p.add_argument("run_id", nargs="?", help="the run to render")
    p.add_argument("--all", action="store_true", help="render every run, then the index")
    args = p.parse_args(argv)
    if bool(args.run_id) == args.all:
        return usage_error("report: give a RUN_ID or --all")
    from lib import report, review

    try:
        settings = records_in_step("report")
        if args.all:
            print(report.write_all(config.outputs_dir()))
            return 0
        run_id = review.find_run(config.outputs_dir(), args.run_id)
        run_dir = runs.run_dir(config.outputs_dir(), run_id)
        marked = report.sweep(config.outputs_dir())
        store_marked(settings, marked)
        if run_id not in marked:  # a swept run has its pages already
            print(report.write(run_dir))
        else:
            print(run_dir / "report.html")
        print(report.write_index(config.outputs_dir()))
    except names.InvalidName as err:
        return usage_error(str(err))
    except FileNotFoundError as err:
        print(f"run_pipeline.py report: {shown(err)}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def review_parser(command: str, description: str, *runs_: str) -> argparse.ArgumentParser:
    """The parser of a command that prints what the records say, as text or `--json`."""
    p = argparse.ArgumentParser(prog=f"run_pipeline.py {command}", description=description)
    for name in runs_:
        p.add_argument(name)
    p.add_argument("--json", action="store_true", help=f"print the {command} as JSON")
    return p


def cmd_runs(argv: list[str]) -> int:
    args = review_parser("runs", "Every run, newest first.").parse_args(argv)
    from lib import report, review

    outputs = config.outputs_dir()
    settings = records_in_step("runs")
    store_marked(settings, report.sweep(outputs))  # runs whose process is gone are shown `abandoned`, with their pages
    rows = review.summaries(outputs)
    print(review.runs_json(rows) if args.json else review.runs_table(rows))
    return 0


def cmd_diff(argv: list[str]) -> int:
    args = review_parser("diff", "Countries added, removed and changed (old → new) between the gold tables of "
                                 "two runs.", "run_a", "run_b").parse_args(argv)
    from lib import review

    try:
        settings = records_in_step("diff")
        run_a, run_b = (review.find_run(config.outputs_dir(), name) for name in (args.run_a, args.run_b))
        report_ = review.diff(settings or config.settings(), run_a, run_b)
    except names.InvalidName as err:
        return usage_error(str(err))
    except PipelineError as err:  # a run's data is missing or unreadable
        print(f"run_pipeline.py diff: {shown(err)}", file=sys.stderr)
        return EXIT_FAILED
    print(review.runs_json(report_) if args.json else review.diff_text(report_))
    return 0


def cmd_publish(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="run_pipeline.py publish",
                                description="Make an earlier proven run the published one again (a rollback): its "
                                            "table state (restored from the history, recorded as a load), then its "
                                            "latest objects and pointer. Takes the pipeline lock.")
    p.add_argument("run_id")
    p.add_argument("--wait-for-lock", type=float, default=0, metavar="SECONDS",
                   help="when another run holds the pipeline lock, wait this long before giving up (default 0)")
    args = p.parse_args(argv)
    from lib import db, publish

    try:
        names.run_id(args.run_id)
        env = config.environment()
        runner.ensure_stack(env)
        settings = config.settings(env)
        logsetup.setup(settings.logs_dir, settings.secrets())
        with db.pipeline_lock(settings.db, f"publish {args.run_id}", args.wait_for_lock):
            record_store.pull(settings, names.run_id(args.run_id))  # it may have been recorded elsewhere
            finish_publishes(settings)
            done = publish.republish(settings, args.run_id)
    except PipelineError as err:
        print(f"run_pipeline.py publish: {shown(err)}", file=sys.stderr)
        return err.exit_code
    load = done["load"]
    print(f"run {done['run_id']} published: {shown(done['table'])} restored (inserted {load['inserted']}, updated "
          f"{load['updated']}, retired {load['retired']}), {len(done['published'])} latest objects")
    return 0


def cmd_params(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="run_pipeline.py params",
                                description="Every stage's parameters: type, default and what it does "
                                            "(set one with -p KEY=VALUE).")
    p.parse_args(argv)
    for stage in registry.STAGES:
        print(f"{stage.name}  {stage.title}")
        for name, spec in parameters.declared(stage.name).items():
            default = json.dumps(spec.default) if isinstance(spec.default, str) else repr(spec.default)
            print(f"  {name:<20} {spec.type_name:<6} {default:<18} {spec.help}")
    return 0


def cmd_run(argv: list[str]) -> int:
    args = run_parser().parse_args(argv)
    # 1. Everything the user typed is checked before any service is touched.
    try:
        if args.resume:
            if args.param or args.run_id or args.stages != registry.ALL:
                raise params.UsageError("--resume takes no --stages, --run-id or -p: it reuses the run's own")
            run_id = names.run_id(args.resume)
        else:
            run_id = names.run_id(args.run_id) if args.run_id else runs.new_run_id()
    except PipelineError as err:  # bad arguments: nothing ran
        return usage_error(str(err))
    # The run's kernel boots (and imports lib) while this process reads the notebooks' parameters
    # (papermill), starts the services, runs the preflight and takes the lock: both cores work from
    # here on. It only runs a stage's cells once everything below has passed; it is stopped otherwise.
    kernels = kernels_.Kernels(args.kernel, run_id)
    kernels.start()
    import_the_rest()
    try:
        try:
            stages = chosen = None
            if not args.resume:
                stages = params.parse_stages(args.stages)
                chosen = runner.parse_parameters(args.param, stages)
            env = config.environment()
            runner.check_configuration(env)  # API URL, outputs and logs folders, before anything starts
            if not (config.uses_embedded_store(env) or config.uses_embedded_db(env)):
                config.settings(env)  # a configured stack: its settings can be checked now
        except PipelineError as err:  # bad arguments or settings: nothing ran
            return usage_error(str(err))
        return start_run(args, run_id, stages, chosen, env, kernels)
    finally:
        kernels.close()


def start_run(args, run_id, stages, chosen, env, kernels) -> int:
    from lib import db, progress

    # 2. Services: start the embedded ones if nothing else is configured.
    progress.install()  # progress lines on stderr while the run goes
    try:
        progress.start_stack(env)  # says what it starts, and how long each service took
        settings = config.settings(env)
    except PipelineError as err:
        if err.exit_code == EXIT_USAGE:  # a bad setting: nothing ran
            return usage_error(str(err))
        print(f"run_pipeline.py: {shown(err)}", file=sys.stderr)
        return err.exit_code
    try:
        logfile = logsetup.setup(settings.logs_dir, settings.secrets())
    except logsetup.LogWriteError as err:  # a log that takes no lines fails the run
        print(f"run_pipeline.py: {shown(err)}", file=sys.stderr)
        return EXIT_FAILED

    # 3. The lock first: a second run learns at once that another one goes, before any preflight.
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(db.pipeline_lock(settings.db, run_id, args.wait_for_lock))
        except db.LockBusy as err:
            print(f"run_pipeline.py: {shown(err)}", file=sys.stderr)
            return err.exit_code
        except db.DatabaseError as err:  # the database does not answer: say it with the rest the preflight finds
            plan = resume_plan(settings, run_id) if args.resume else (stages, chosen)
            if plan is None:
                return usage_error(f"--resume {run_id}: no run record at {runs.run_dir(settings, run_id)}")
            found = runner.preflight(settings, plan[0] or [], plan[1] or {})
            return preflight_failed(settings, run_id, plan[0] or [], plan[1] or {}, found or [f"database: {err}"],
                                    logfile, kernels)
        try:
            return locked_run(args, run_id, stages, chosen, env, settings, logfile, kernels)
        except PipelineError as err:  # the database or the object store went away
            print(f"run_pipeline.py: {shown(err)}", file=sys.stderr)
            return err.exit_code


def resume_plan(settings, run_id) -> tuple[list[str], dict] | None:
    """The stages a resumed run still has to run (from its first that did not succeed) and their
    parameters, or None when the run has no record."""
    previous = runs.read_json(runs.manifest_path(settings, run_id))
    if previous is None:
        return None
    first = runs.RunRecord(settings, run_id, previous).first_unfinished()
    return previous["requested_stages"][first:], previous["parameters"]


def preflight_failed(settings, run_id, stages, chosen, problems, logfile, kernels, record_new=False) -> int:
    """Say what the preflight found; an existing run (or, with `record_new`, a new one) records it so
    that `--resume` goes on with the stages asked for. Nothing ran."""
    kernels.close()
    print("Preflight failed, nothing was run:\n" + "\n".join(f"  - {shown(p)}" for p in problems), file=sys.stderr)
    failed, record = {"run_id": run_id, "status": "failed", "preflight": problems}, None
    if record_new or runs.manifest_path(settings, run_id).exists():
        try:
            record = runs.RunRecord.open(settings, run_id, stages, chosen)
            record.data["preflight"] = problems
            record.finish("failed")
            failed = record.data
            record_store.push(settings, run_id)  # when the store is what failed, the next push stores it
            print(f"  after fixing the cause: {resume_hint(run_id)}", file=sys.stderr)
        except OSError as err:  # not even the record fits
            print(f"  no run record was written: {shown(err)}", file=sys.stderr)
    from lib import alerts

    # A scheduled run stopped here is as much worth an alert as one that failed in a stage.
    alerts.after_run(failed, runs.run_dir(settings, run_id), settings.secrets(), logfile)
    runner.settle_side_channels(record)
    return EXIT_FAILED


def resume_hint(run_id: str) -> str:
    return hints.command("--resume", run_id)


def input_run(settings: config.Settings, run_id: str, stages: list[str],
              chosen: dict[str, dict]) -> tuple[str | None, str | None]:
    """(the run a run reads from, or None; a problem for the preflight, or None). A new run that
    starts after the first stage reads the data of the run named by `-p input_run=RUN_ID`, else of
    the latest published run of its table (lib/publish.py `latest_published`); a recorded run whose
    stages run again (`--stages 3 --run-id ID`) reads what it read before."""
    from lib import publish  # the table's pointer: only now (it imports what the stages need)

    recorded = runs.read_json(runs.manifest_path(settings, run_id))
    if recorded is not None:
        return recorded.get("based_on"), None
    given = next((chosen.get(s, {}).get("input_run") for s in stages if chosen.get(s, {}).get("input_run")), "")
    if given:
        record_store.pull(settings, given)  # wherever it was recorded
        if not runs.manifest_path(settings, given).exists():
            return None, f"input_run {given}: there is no run {given} in {runs.runs_dir(settings)}"
        return given, None
    if not parameters.reads_a_run(stages[0], chosen.get(stages[0], {})):
        return None, None
    table = next((chosen[s]["table"] for s in stages if chosen.get(s, {}).get("table")), parameters.DEFAULT_TABLE)
    found = publish.latest_published(settings, table)
    if found is None:
        return None, (f"stages {', '.join(stages)} read the data of the latest published run, and table {table} has "
                      f"none yet: run every stage first (make run), or name the run to read with -p input_run=RUN_ID")
    return found, None


def locked_run(args, run_id, stages, chosen, env, settings, logfile, kernels) -> int:
    """Everything a run does holding the pipeline lock: preflight, finishing earlier publishes, marking
    runs that ended unsaid, then the stages."""
    from lib import db, endings, report, storage

    # This run's record as the records bucket has it (another worker or checkout may have begun it),
    # and the runs still recorded as running, which the sweep below looks at.
    stored = []
    try:
        record_store.pull_for_run(settings, [run_id])
    except storage.StorageError as err:
        stored = [f"records: {err}"]
    if args.resume:
        plan = resume_plan(settings, run_id)
        if plan is None:
            return usage_error(f"--resume {run_id}: no run record at {runs.run_dir(settings, run_id)}")
        stages, chosen = plan
        if not stages:
            print(f"run {run_id} already succeeded: nothing to resume")
            return 0
        log.info("resuming run %s at %s", run_id, stages[0])
    preflight_hints: dict[str, dict] = {}
    problems = stored + runner.preflight(settings, stages, chosen, preflight_hints)
    based_on = None
    if not args.resume and not problems:
        based_on, nothing = input_run(settings, run_id, stages, chosen)
        problems += [nothing] if nothing else []
        if based_on:  # the records its stages prove their inputs against
            record_store.pull(settings, based_on)
    if problems:
        return preflight_failed(settings, run_id, stages, chosen, problems, logfile, kernels)
    runner.install_signal_handlers()
    if args.resume:  # a killed run's kernel, and its database session, would write or block beside it
        endings.stop_orphans(settings.outputs_dir, run_id)
        db.end_run_sessions(settings.db, run_id)
    finished = finish_publishes(settings)
    # Runs that ended unsaid: marked, with their pages, and stored so.
    store_marked(settings, report.sweep(settings.outputs_dir, holding_lock=run_id))
    space = config.space_problems(env, runner.expected_payload(settings))
    if space:  # recorded, so that `--resume` goes on once there is room
        return preflight_failed(settings, run_id, stages, chosen, space, logfile, kernels, record_new=True)
    return run_stages(settings, env, run_id, stages, chosen, args, logfile, kernels, preflight_hints, finished,
                      based_on)


def finish_publishes(settings) -> list[dict]:
    """Before anything else under the lock: a publish stopped half-way is finished, and staging copies
    older than `publish.STAGING_KEEP_DAYS` that were never published are dropped."""
    from lib import publish

    finished = publish.finish_pending(settings)
    publish.drop_stale_staging(settings)
    for done in finished:
        print(f"finished the publish of run {done['run_id']} (table {shown(done['table'])}), stopped before its pointer")
    return finished


def run_stages(settings, env, run_id, stages, chosen, args, logfile, kernels=None, preflight_hints=None, finished=(),
               based_on=None) -> int:
    from lib import alerts, report

    record = runs.RunRecord.open(settings, run_id, stages, chosen, based_on)
    if based_on:
        print(f"run {run_id} reads the data of run {based_on} for the stages before {stages[0]}")
    if finished:  # this run's record says which earlier publish it finished first
        record.data["finished_publishes"] = list(finished)
        record.save()
    try:
        runs.hold_reserve(record.dir)  # room for the final record, whatever fills the disk meanwhile
    except OSError as err:
        record.data["preflight"] = [str(err)]
        record.finish("failed")
        print(f"run_pipeline.py: {shown(err)}\n  after fixing the cause: {resume_hint(run_id)}", file=sys.stderr)
        return EXIT_FAILED
    record_store.push(settings, run_id)  # the run as it starts: `running`, for any worker to see
    why = settings.why
    print(f"run {run_id}: stages {', '.join(stages)} on {settings.store.kind} ({why['object_store']}) + "
          f"{settings.db.kind} ({why['database']}), cloud {settings.cloud.kind}; snapshot fallback "
          f"{'on' if settings.snapshot_fallback else 'off'} ({why['snapshot_fallback']})")
    status, code = "succeeded", 0
    # nbconvert gets ready while the kernel boots; the notebooks' pages are rendered after the stages.
    pages = report.Pages(record.dir)
    for stage in stages:
        try:
            # Preflight's findings (preflight_hints) steer this run only; the record keeps what was asked for.
            given = chosen.get(stage, {})
            runner.execute(record, stage, {**(preflight_hints or {}).get(stage, {}), **given}, kernel=args.kernel,
                           start_timeout=args.kernel_start_timeout, cell_timeout=args.cell_timeout,
                           kernels=kernels)
        except runner.Interrupted as why:
            status, code = "interrupted", EXIT_INTERRUPTED
            print(f"\nrun {run_id} interrupted ({why}) during {stage}; "
                  f"resume with: {resume_hint(run_id)}", file=sys.stderr)
            break
        except Exception as err:  # noqa: BLE001 - any stage failure ends the run the same way
            status, code = "failed", EXIT_FAILED
            print(f"\nstage {stage} FAILED in {shown(runner.failed_cell(err))}\n"
                  f"  open the executed notebook: {record.dir / (stage + '.ipynb')}\n"
                  f"  after fixing the cause:     {resume_hint(run_id)}", file=sys.stderr)
            break
    if status == "succeeded" and registry.reconciler().name in stages:
        # The run is proven: what consumers read moves to it now, in a fixed order (lib/publish.py),
        # while this run holds the pipeline lock. Not when its log lost lines or the disks are too
        # full to take what the publish writes.
        from lib import publish

        try:
            refused = config.space_problems(env, runner.expected_payload(settings, run_id))
            if logsetup.failure():
                refused.append(logsetup.failure())
            if refused:
                raise publish.PublishError("; ".join(refused))
            started = time.monotonic()
            publish.run(settings, run_id)
            record.data["publish_s"] = round(time.monotonic() - started, 2)
        except PipelineError as err:
            status, code = "failed", EXIT_FAILED
            record.data["error"] = f"not published: {err}"
            print(f"\nrun {run_id} was not published: {shown(err)}\n  after fixing the cause: {resume_hint(run_id)}",
                  file=sys.stderr)
    if kernels is not None and status != "succeeded":
        kernels.close()  # before the summary: a failed or interrupted stage's kernel ends with the run
    record.finish(status)
    # The alert is queued now and goes out while the pages are rendered (never raises, exit code unchanged).
    alerts.after_run(record.data, record.dir, settings.secrets())
    # The index's trend pictures are drawn by the run's kernel (matplotlib is imported there for the
    # gold chart) while this process writes the run's report; then the kernel ends.
    pictures = kernels.draw_trends(record.dir.parent.parent) if kernels is not None else None
    try:
        report.after_run(record.dir, pages, pictures)  # report.html of the run and outputs/index.html
    finally:
        if kernels is not None:
            kernels.close()
        # Lineage events and the alert still on their way: at most outbox.BUDGET_S, then in the record.
        runner.settle_side_channels(record)
    # The record as it ended, into the records bucket: any worker or checkout now sees the same run.
    stored = record_store.push(settings, run_id)
    print(f"\nrun {run_id} {status.upper()}")
    print(f"  run record: {record.dir}  (manifest.json and one executed notebook per stage)")
    print(f"  stored:     {record_store.where(settings, run_id)}" if stored else
          "  stored:     NOT YET: the records bucket did not take it (see the log); the next run or "
          "`runs` stores it")
    print(f"  report:     {record.dir / 'report.html'}  (all runs: {record.dir.parent.parent / 'index.html'})")
    print(f"  log:        {logfile}")
    for stage in record.data["requested_stages"]:
        print(runner.summary_line(stage, record.data["stages"].get(stage, {"status": "not run"})))
    return code


COMMANDS = {"stack": cmd_stack, "lab": cmd_lab, "report": cmd_report, "runs": cmd_runs, "diff": cmd_diff,
            "params": cmd_params, "publish": cmd_publish}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in COMMANDS:
            import_the_rest()
            return COMMANDS[argv[0]](argv[1:])
        return cmd_run(argv)
    except (files.NoSpace, logsetup.LogWriteError) as err:  # a full disk: said in one line, never a traceback
        print(f"run_pipeline.py: {shown(err)}", file=sys.stderr)
        return EXIT_FAILED


def leave(code: int) -> None:
    """Exit with `code` once everything is written, without the interpreter's teardown: freeing the
    modules a run imports (papermill, nbconvert, matplotlib, pandas …) costs about half a second of
    CPU for nothing. The exit handlers run first (logging flushes and closes its files), then the
    standard streams are flushed."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    leave(main() or 0)
