"""A quiet terminal: third-party warnings, log lines and progress bars stay off the user's screen during autoq's
work, so a user sees autoq's own lines only; `--verbose` (the environment variable AUTOQ_VERBOSE, which spawned
workers inherit) shows them."""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout

VERBOSE_ENV = "AUTOQ_VERBOSE"
NOISY_LOGGERS = ("torch", "torchao", "nncf", "onnxruntime", "openvino", "optuna", "transformers", "onnxscript")
OWN_LOGGER_CLASS = ("nncf",)  # installs its Logger subclass at import and calls its methods (`info_once`): a plain
# logger of that name made before the import breaks every compress_weights call


def hush() -> None:
    """Unless verbose: ignore warnings raised outside autoq, raise third-party loggers to ERROR, switch off tqdm
    and transformers' progress output. Called by the CLI and by every trial worker."""
    if os.environ.get(VERBOSE_ENV):
        return
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"autoq(\.|$)")  # autoq's own warnings still show
    for name in ("", *NOISY_LOGGERS):
        if name in OWN_LOGGER_CLASS and name not in logging.root.manager.loggerDict:
            continue  # made now, it would be a plain Logger: autoq hushes it where it imports the library
        logging.getLogger(name).setLevel(logging.ERROR)
    # torch sets its loggers' levels when it is imported, after this (its _pytree warnings at torchao's import):
    # records below ERROR are dropped whatever a library sets later
    logging.disable(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def set_verbose(verbose: bool) -> None:
    if verbose:
        os.environ[VERBOSE_ENV] = "1"


@contextmanager
def captured() -> Iterator[None]:
    """Keep what a third-party call prints (progress bars, advice) off the terminal, unless verbose."""
    if os.environ.get(VERBOSE_ENV):
        yield
        return
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


@contextmanager
def native_stderr_hushed() -> Iterator[None]:
    """Keep what native code writes straight to file descriptor 2 off the terminal, unless verbose: torch's
    profiler announces every start and stop there (`USDT: ... profiler_start`), out of Python's reach."""
    if os.environ.get(VERBOSE_ENV):
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
