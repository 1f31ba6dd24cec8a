"""What every entry point shares: absl flags with config mistakes as one line, and exit status 2 for them."""

import logging
import re
import sys
from collections.abc import Callable

from absl import app, flags
from absl import logging as absl_logging

from llmjax.config import ConfigError


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with mistakes in the config file or its overrides raised as one ConfigError:
    ml_collections wraps them (the config file's own ConfigError, or an AttributeError for a misspelt
    --config.key) in errors whose messages carry whole tracebacks."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError) as e:
        chain, link = [], e
        while link is not None:
            chain.append(link)
            link = link.__cause__ or link.__context__
        config_errors = [x for x in chain if isinstance(x, ConfigError)]
        if config_errors:  # the innermost one is ours; outer ones carry its traceback as text
            raise ConfigError(str(config_errors[-1])) from None
        if isinstance(e, AttributeError | KeyError):  # ml_collections: a --config.key override that does not exist
            bad = re.findall(r"\w+", str(e))[:1]
            hint = re.search(r'Did you mean "(\w+)"', str(e))
            raise ConfigError(f"--config override: no config key named {bad[0] if bad else str(e)!r}"
                              + (f"; did you mean {hint[1]!r}?" if hint else "; check the key's spelling")) from None
        raise ConfigError(f"bad flags: {e}") from None


def run_main(main: Callable[[list[str]], None]) -> None:
    """absl's app.run for our entry points: a ConfigError prints as one line and exits with status 2 (no
    traceback); library INFO chatter (orbax) is hidden, llmjax's own progress logs are kept."""

    def wrapped(argv):
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("llmjax").setLevel(logging.INFO)
        main(argv)

    try:
        app.run(wrapped, flags_parser=_parse_flags)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
