"""What every entry point shares: absl flags with config mistakes as one line, and exit status 2 for them."""

import logging
import os
import re
import sys
from collections.abc import Callable

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from llmjax.errors import LlmjaxError

# ml_collections keeps a config file it could not load as this placeholder, and raises only when it is read.
_UNLOADED = getattr(config_flags.config_flags, "_ErrorConfig", ())


def _unloadable(error: BaseException) -> LlmjaxError:
    """A config file ml_collections could not load (its message lists each path it tried), as one line."""
    text = str(error)
    tried = re.search(r"Attempted \[.*?\]:\n\s*(.+)\n\s*(.+)", text)
    path, reason = (tried[1].strip(), tried[2].strip()) if tried else ("", text.strip().splitlines()[-1])
    if "No such file" in reason:
        reason = f"no such file (relative paths start at {os.getcwd()!r}); pass one of configs/*.py"
    return LlmjaxError(f"--config={path}: {reason}" if path else f"config file: {reason}")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with mistakes in the config file or its overrides raised as one LlmjaxError:
    ml_collections wraps them (the config file's own LlmjaxError, or an AttributeError for a misspelt
    --config.key) in errors whose messages carry whole tracebacks, and defers a config file it cannot load
    (missing, unreadable) to the first read of the config."""
    try:
        argv = flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, OSError) as e:
        chain, link = [], e
        while link is not None:
            chain.append(link)
            link = link.__cause__ or link.__context__
        unloaded = [x for x in chain if isinstance(x, OSError) and "Failed loading config file" in str(x)]
        if unloaded:  # an override of a config file that did not load
            raise _unloadable(unloaded[-1]) from None
        if isinstance(e, OSError):
            raise
        config_errors = [x for x in chain if isinstance(x, LlmjaxError)]
        if config_errors:  # the innermost one is ours; outer ones carry its traceback as text
            raise LlmjaxError(str(config_errors[-1])) from None
        if isinstance(e, AttributeError | KeyError):  # ml_collections: a --config.key override that does not exist
            bad = re.findall(r"\w+", str(e))[:1]
            hint = re.search(r'Did you mean "(\w+)"', str(e))
            raise LlmjaxError(f"--config override: no config key named {bad[0] if bad else str(e)!r}"
                              + (f"; did you mean {hint[1]!r}?" if hint else "; check the key's spelling")) from None
        raise LlmjaxError(f"bad flags: {e}") from None
    for name in flags.FLAGS:
        value = flags.FLAGS[name].value
        if _UNLOADED and isinstance(value, _UNLOADED):
            raise _unloadable(object.__getattribute__(value, "_error"))
    return argv


def init_distributed(requested: bool = False) -> None:
    """One process per host. Clusters JAX detects (TPU pods, SLURM, Open MPI, ...) need nothing more than
    `requested` (--config.distributed=True); elsewhere set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES
    and JAX_PROCESS_ID on every host."""
    env = os.environ
    if requested or "JAX_COORDINATOR_ADDRESS" in env:
        n, i = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
        jax.distributed.initialize(num_processes=n and int(n), process_id=i and int(i))


def run_main(main: Callable[[list[str]], None]) -> None:
    """absl's app.run for our entry points: a LlmjaxError prints as one line and exits with status 2 (no
    traceback); library INFO chatter (orbax) is hidden, llmjax's own progress logs are kept."""

    def wrapped(argv):
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("llmjax").setLevel(logging.INFO)
        main(argv)

    try:
        app.run(wrapped, flags_parser=_parse_flags)
    except LlmjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
