"""The `nti` command: `nti fit` inverts images, `nti predict` edits inversions, `nti report`
puts the reports of several runs in one table, `nti train-demo` trains the built-in demo model,
`nti bench` runs PIE-Bench end to end (`--config FILE`) or scores a folder of outputs (`--score DIR`).
`nti app` serves an editor in the browser.

`fit` and `predict` are `LightningCLI`s, so every argument of the module, the data module and the Trainer
can come from YAML (`--config`), the command line, or both; `--print_config` shows the result.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from nti_lightning.errors import (
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    NtiError,
    OptionError,
)
from nti_lightning.host_memory import keep_freed_memory_unless_disabled
from nti_lightning.training.callback import NullTextWalkCallback
from nti_lightning.training.cli import fit_cli


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the `nti` console script: runs the command and exits with its status.

    A user's mistake (`NtiError`) is printed as one line, `nti: error: <message>`, with exit
    status 2; set `NTI_DEBUG=1` to see its traceback. glibc's heap is first set to keep freed
    memory (`host_memory.keep_freed_memory`; `NTI_KEEP_FREED_MEMORY=0` leaves its defaults).
    Returns normally when every image (or edit) succeeded; otherwise raises `SystemExit` with one
    of the statuses above.
    """
    # Before anything large is allocated: a CPU run's per-step buffers then stay in the heap
    # instead of being page-faulted in again at every step (see `host_memory`).
    keep_freed_memory_unless_disabled()
    try:
        status = _run(list(sys.argv[1:] if args is None else args), args)
    except NtiError as error:
        if os.environ.get("NTI_DEBUG"):
            raise
        message = " ".join(str(error).split())  # one line, whatever the message holds
        print(f"nti: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except SIGTERMException:
        raise SystemExit(EXIT_SIGTERM) from None
    except SystemExit as exit_:
        # Lightning turns Ctrl-C inside fit/predict into `sys.exit(1)` after its clean-up.
        if isinstance(exit_.__context__, KeyboardInterrupt):
            raise SystemExit(EXIT_SIGINT) from None
        raise
    except KeyboardInterrupt:  # outside fit/predict, e.g. while the model loads
        print("interrupted", file=sys.stderr)
        raise SystemExit(EXIT_SIGINT) from None
    finally:
        _close_process_group()
    if status != EXIT_OK:
        raise SystemExit(status)


def _close_process_group() -> None:
    """Destroys the process group a multi-device run left, while Python can still do it cleanly.

    Lightning destroys only NCCL groups at exit. A gloo group left to interpreter shutdown is torn
    down with its worker threads still joinable, which now and then aborts the process
    ("terminate called without an active exception", status -6) after all its work was written.
    Destroying it is local to this process: no collective, so a rank that stopped early cannot hang.
    """
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception as error:  # clean-up at exit: never hide the run's own status behind it
            print(f"nti: warning: could not close the process group ({error})", file=sys.stderr)


#: The commands of `nti`, each with its line of `nti --help`.
COMMANDS = {
    "fit": "invert images (one, a list, a folder or a manifest) into .safetensors inversions",
    "predict": "edit inversions with Prompt-to-Prompt (replace, refine, reweight, local blend)",
    "app": "invert a photo once and edit it live in the browser (needs the [app] extra: Gradio)",
    "report": "put the reports of several fit runs in one table",
    "train-demo": "train the built-in `shapes` demo model",
    "bench": "PIE-Bench end to end (nti bench --config FILE), or score a folder of outputs (--score DIR)",
}

USAGE = "usage: nti {" + ",".join(COMMANDS) + "} [options]"


def help_text() -> str:
    """What `nti`, `nti -h` and `nti --help` print."""
    width = max(map(len, COMMANDS))
    lines = [USAGE, "", "Null-text Inversion and Prompt-to-Prompt editing with Stable Diffusion.", "", "commands:"]
    lines += [f"  {name:<{width}}  {line}" for name, line in COMMANDS.items()]
    lines += ["", "`nti COMMAND --help` shows a command's options; fit and predict take `--config FILE.yaml`.",
              "exit status: 0 done, 1 some images or edits failed, 2 usage or input error, 130/143 interrupted."]
    return "\n".join(lines)


def _run(args: list[str], given: Optional[list[str]]) -> int:
    """Runs one `nti` command (`args`: the words after `nti`); returns its exit status.

    The LightningCLIs get `given`, which is `None` for the command line: given both, they warn.
    """
    if args and args[0] == "predict":
        from nti_lightning.editing.cli import main as edit_main
        from nti_lightning.editing.writer import EditWriter

        cli = edit_main(given)
        return _status(cli, EditWriter)
    if args and args[0] == "train-demo":
        from nti_lightning.demo.train import main as train_demo_main

        train_demo_main(args[1:])
        return EXIT_OK
    if args and args[0] == "bench":
        # both ways, --config FILE and --score DIR
        from nti_lightning.bench.run import main as bench_main

        scores = bench_main(args[1:])
        # Outputs that could not be scored are failed rows (the CSV, under the tables): 1, as a fit's failed images.
        return EXIT_SOME_FAILED if getattr(scores, "failed", None) else EXIT_OK
    if args and args[0] == "app":
        from nti_lightning.app.cli import main as app_main

        app_main(args[1:])
        return EXIT_OK
    if args and args[0] == "report":
        from nti_lightning.inversion.dataset_report import main as report_main

        report_main(args[1:])
        return EXIT_OK
    if not args or args[0] in ("-h", "--help"):
        print(help_text())
        return EXIT_OK
    if args[0].startswith("-"):
        raise OptionError(f"the command comes first: {USAGE[len('usage: '):]} (`nti --help` lists them)")
    if args[0] != "fit":
        raise OptionError(f"unknown command {args[0]!r}; use one of: {', '.join(f'nti {name}' for name in COMMANDS)}")
    return _status(fit_cli(given), NullTextWalkCallback)


def _status(cli: LightningCLI, counter: type) -> int:
    """1 when the run's callback of type `counter` (it counts `failed`) saw failures, else 0."""
    trainer = getattr(cli, "trainer", None)
    failed = sum(
        getattr(callback, "failed", 0)
        for callback in (trainer.callbacks if trainer else [])
        if isinstance(callback, counter)
    )
    return EXIT_SOME_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    main()
