"""Errors that stop a run with one clear line (see `moejax.main`)."""


class MoejaxError(Exception):
  """Base class: `main` prints `moejax: error: <message>` and exits non-zero."""

  exit_code = 1


class ConfigError(MoejaxError):
  """An invalid key, value or cross-field combination in a config."""

  exit_code = 2


class DataError(MoejaxError):
  """A missing, empty or unusable corpus."""


class WorkdirError(MoejaxError):
  """A workdir that cannot be created or written."""


class CheckpointError(MoejaxError):
  """No checkpoint in a workdir can be restored."""


class DistributedError(MoejaxError):
  """This process could not join (or form) the multi-process runtime."""

  exit_code = 4


class NonFiniteLossError(MoejaxError):
  """The training loss became NaN or infinite; the last good checkpoint is kept."""

  exit_code = 3


class Preempted(MoejaxError):
  """SIGTERM arrived; a checkpoint was saved and the run can be resumed."""

  exit_code = 143


class Interrupted(MoejaxError):
  """Ctrl-C (SIGINT) arrived; a checkpoint was saved when training had started."""

  exit_code = 130


class WorkdirBusy(MoejaxError):
  """Another live run holds the workdir's lock."""

  exit_code = 5


class ConfigMismatch(MoejaxError):
  """The workdir was started with another configuration."""

  exit_code = 2
